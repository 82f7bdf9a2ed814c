"""Evaluation: k samples per benchmark problem through the training rollout engines, scored by the benchmark's
reward; avg@k, unbiased pass@k, maj@k, lengths and truncation; per-sample details and one summary row."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

import pandas as pd

from kalmanrl.configuration.config import config_hash
from kalmanrl.configuration.settings import resolve_evaluate
from kalmanrl.core.io import write_parquet
from kalmanrl.core.progress import progress
from kalmanrl.data.dataset import read_dataset
from kalmanrl.data.prompts import get_template
from kalmanrl.data.rewards import get_reward, limit_hits
from kalmanrl.jobs.stage import completion_budgets, encode_prompts, engine_from_settings, fitting_prompts, length_limit
from kalmanrl.policy.model import load_policy, load_tokenizer
from kalmanrl.policy.rollout import SamplingConfig
from kalmanrl.reporting.metrics import summarise
from kalmanrl.runtime.devices import resolve_device
from kalmanrl.runtime.provenance import provenance

log = logging.getLogger(__name__)


def command_line(model_dir: str | Path, dataset: str | Path, settings: dict) -> str:
    """The `kalmanrl evaluate` call that reproduces one summary row, shell-quoted (outputs to the working directory)."""
    return shlex.join(["kalmanrl", "evaluate", "--settings", json.dumps(settings, sort_keys=True), "--model",
                       str(model_dir), "--dataset", str(dataset), "--details", "details.parquet", "--summary",
                       "summary.parquet"])


def evaluate(model_dir: str | Path, dataset: str | Path, *, settings: dict, out_details: str | Path,
             out_summary: str | Path, gpus: int | None = None) -> dict:
    """Sample settings["evaluate"]["k"] completions per test problem; write details and the summary row."""
    resolved = resolve_evaluate(settings)
    cfg, rollout, ident = resolved.evaluate, resolved.rollout, resolved.ident
    # vLLM loads its own copy of the weights and is the only user of the GPU here: no torch policy, and the
    # engine gets the memory a training job would have shared with the policy.
    vllm = rollout.backend == "vllm"
    if vllm:
        policy, tokenizer, positions = None, load_tokenizer(model_dir), None
    else:
        policy, tokenizer = load_policy(model_dir, device=resolve_device(gpus))
        policy.eval()
        positions = getattr(policy.config, "max_position_embeddings", None)
    problems = read_dataset(dataset, split="test").to_pandas()
    if cfg.max_problems:
        problems = problems.iloc[:cfg.max_problems]
    template = get_template(resolved.template, resolved.chat_template_kwargs,
                            add_special_tokens=resolved.add_special_tokens)
    prompt_ids = encode_prompts(tokenizer, template, problems["problem"])
    # Prompts that leave no room for a completion in the engine's context or evaluate.max_length are dropped
    # (counted in the summary) or refused, per rollout.overlong_prompts; the others get at most what is left.
    limit = length_limit(rollout.context(positions), cfg.max_length)
    kept = fitting_prompts(prompt_ids, limit, rollout.overlong_prompts, f"the test split of {dataset}",
                           fix="raise rollout.max_model_len (vLLM) or evaluate.max_length, or evaluate a model with a "
                               "longer context")
    overlong_dropped = len(problems) - len(kept)
    problems, prompt_ids = problems.iloc[kept].reset_index(drop=True), [prompt_ids[i] for i in kept]
    sampling = dict(n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)
    completions = []
    overrides = {"gpu_memory_utilization": rollout.eval_gpu_memory_utilization} if vllm else {}
    with engine_from_settings(rollout, policy=policy, tokenizer=tokenizer, model_dir=model_dir,
                              dtype=resolved.model_dtype, **overrides) as engine:
        for start in progress(range(0, len(prompt_ids), cfg.batch_size), desc=f"evaluate {ident['benchmark']}",
                          unit="batch"):
            batch = prompt_ids[start:start + cfg.batch_size]
            budgets = completion_budgets(batch, cfg.max_tokens, limit)
            # Seeded by each problem's position in the benchmark, so neither evaluate.batch_size (a memory knob) nor
            # the problems dropped before it change which samples a problem gets.
            completions += engine.generate(batch, SamplingConfig(**sampling, seed=cfg.seed,
                                                                 positions=tuple(kept[start:start + len(batch)]),
                                                                 budgets=budgets))

    flat = [c for group in completions for c in group]
    golds = [g for g in problems["answer"] for _ in range(cfg.k)]
    with get_reward(resolved.reward, **resolved.reward_params) as reward:
        verdicts = reward.judge([c.text for c in flat], golds)
    step = ident["step"]
    details = pd.DataFrame({
        **{key: [ident.get(key)] * len(flat) for key in ("model", "task", "algorithm", "seed", "benchmark")},
        "step": step, "problem_id": [p for p in problems["id"] for _ in range(cfg.k)],
        "sample_index": [i for _ in range(len(problems)) for i in range(cfg.k)],
        "completion": [c.text for c in flat], "extracted": [v.extracted for v in verdicts],
        "reward": [v.reward for v in verdicts], "correct": [v.correct for v in verdicts],
        "num_tokens": [len(c.token_ids) for c in flat], "finish_reason": [c.finish_reason for c in flat]})
    details["seed"] = details["seed"].astype("Int64")
    details["step"] = details["step"].astype("Int64")
    summary = {**{key: ident.get(key) for key in ("model", "task", "algorithm", "seed", "benchmark")}, "step": step,
               **summarise(details, cfg.pass_k, extra_metrics=cfg.extra_metrics),
               "limit_hits": limit_hits(verdicts),  # samples scored 0 for hitting a reward limit, not judged
               "overlong_prompts_dropped": overlong_dropped,  # test problems left out before sampling
               **{f"sampling_{k}": v for k, v in sampling.items()},
               "rollout_backend": rollout.backend,  # the engine that ran ("auto" resolved)
               **provenance(config_hash(settings), {"data": [dataset],
                                                    "model": sorted(Path(model_dir).glob("model*.safetensors"))}),
               "command": command_line(model_dir, dataset, settings)}
    summary_frame = pd.DataFrame([summary]).astype({"seed": "Int64", "step": "Int64"})
    write_parquet(details, out_details)
    write_parquet(summary_frame, out_summary)
    log.info("%s on %s: avg@%d %.3f", ident.get("algorithm"), ident.get("benchmark"), cfg.k, summary["avg_at_k"])
    return summary
