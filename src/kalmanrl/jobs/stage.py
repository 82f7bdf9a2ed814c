"""What the train and evaluate stages share before their loops start: prompts encoded through a template, the length
rules both engines follow (overlong prompts dropped or refused, each prompt's completion budget), and the rollout
engine the settings' `rollout` section describes (the device: `kalmanrl.runtime.devices.resolve_device`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from kalmanrl.configuration.settings import Rollout
from kalmanrl.data.prompts import PromptTemplate
from kalmanrl.policy.rollout import RolloutEngine, make_engine

log = logging.getLogger(__name__)


def encode_prompts(tokenizer, template: PromptTemplate, problems: Iterable[str]) -> list[list[int]]:
    """Token ids of each problem rendered and encoded by `template` (`PromptTemplate.encode`)."""
    return [template.encode(tokenizer, p) for p in problems]


def length_limit(context: int | None, max_length: int | None) -> float:
    """The tighter of the engine's context and a stage's `max_length` (train.max_length or evaluate.max_length; inf
    when neither limits)."""
    return min(math.inf if context is None else context, math.inf if max_length is None else max_length)


def completion_budgets(prompt_ids: Sequence[Sequence[int]], max_tokens: int, limit: float) -> tuple[int, ...] | None:
    """Each prompt's completion budget, min(max_tokens, limit - prompt length); None when every prompt gets
    max_tokens (sampling exactly as without a limit)."""
    budgets = tuple(int(min(max_tokens, limit - len(ids))) for ids in prompt_ids)
    if min(budgets, default=1) < 1:
        raise ValueError(f"a prompt of {max(len(ids) for ids in prompt_ids)} tokens leaves no room for a completion "
                         f"within {limit} tokens: overlong prompts are dropped (or refused) before sampling")
    return None if all(b == max_tokens for b in budgets) else budgets


def drop_overlong(prompt_ids: Sequence[Sequence[int]], limit: float, policy: str, what: str) -> list[int]:
    """Indices of the prompts that leave room for at least one completion token within `limit`. The others are
    dropped and logged (verl's overlong-prompt filter) with `policy` "drop", refused with "error"; `what` names the
    prompts (e.g. the dataset) in messages."""
    if policy not in ("drop", "error"):
        raise ValueError(f"unknown rollout.overlong_prompts {policy!r}; known: drop, error")
    kept = [i for i, ids in enumerate(prompt_ids) if len(ids) < limit]
    dropped = len(prompt_ids) - len(kept)
    if dropped and policy == "error":
        longest = max(len(ids) for ids in prompt_ids)
        raise ValueError(f"{dropped} prompt(s) of {what} (the longest {longest} tokens) leave no room for a completion "
                         f"within {limit} tokens (the engine's context: rollout.max_model_len, or the model's "
                         "max_position_embeddings; or train.max_length / evaluate.max_length); raise the limit, or set "
                         "rollout.overlong_prompts: drop to leave them out")
    if dropped:
        log.warning("%s: dropped %d of %d prompts that leave no room for a completion within %s tokens "
                    "(rollout.overlong_prompts: drop)", what, dropped, len(prompt_ids), limit)
    return kept


def fitting_prompts(prompt_ids: Sequence[Sequence[int]], limit: float, policy: str, what: str, *, fix: str
                    ) -> list[int]:
    """`drop_overlong`, refusing (with `fix`, what to change) a stage whose every prompt is overlong."""
    kept = drop_overlong(prompt_ids, limit, policy, what)
    if not kept:
        raise ValueError(f"every prompt of {what} is overlong for {limit} tokens: {fix}")
    return kept


def engine_from_settings(rollout: Rollout, *, policy: torch.nn.Module | None, tokenizer, model_dir: str | Path,
                         dtype: str = "float32", **overrides) -> RolloutEngine:
    """The rollout engine of a stage's resolved `rollout` settings (its backend and the options its engine reads,
    `overrides` winning), serving the model's configured `dtype`."""
    return make_engine(rollout.backend, policy=policy, tokenizer=tokenizer, model_dir=model_dir, dtype=dtype,
                       **{**rollout.engine_options(), **overrides})
