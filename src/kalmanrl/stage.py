"""What the train and evaluate stages share before their loops start: prompts encoded through a template, and the
rollout engine the settings' `rollout` section describes (the device: `kalmanrl.devices.resolve_device`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from kalmanrl.prompts import PromptTemplate
from kalmanrl.rollout import RolloutEngine, make_engine


def encode_prompts(tokenizer, template: PromptTemplate, problems: Iterable[str]) -> list[list[int]]:
    """Token ids of each problem rendered by `template` (the template adds any special tokens itself)."""
    return [tokenizer(template.render(tokenizer, p), add_special_tokens=False)["input_ids"] for p in problems]


def engine_from_settings(rollout: dict, *, policy: torch.nn.Module | None, tokenizer, model_dir: str | Path,
                         dtype: str = "float32", **overrides) -> RolloutEngine:
    """The rollout engine of a stage's `rollout` settings (backend plus the options its engine reads, `overrides`
    winning), serving the model's configured `dtype`."""
    return make_engine(rollout["backend"], policy=policy, tokenizer=tokenizer, model_dir=model_dir, dtype=dtype,
                       **{**{k: v for k, v in rollout.items() if k != "backend"}, **overrides})
