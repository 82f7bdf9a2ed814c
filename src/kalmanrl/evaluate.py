"""Evaluation: k samples per benchmark problem through the training rollout engines, scored by the benchmark's
reward; avg@k, unbiased pass@k, maj@k, lengths and truncation; per-sample details and one summary row."""

from __future__ import annotations

import json
import logging
import math
import shlex
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from kalmanrl.config import config_hash
from kalmanrl.data import read_dataset
from kalmanrl.io import write_parquet
from kalmanrl.model import load_policy, load_tokenizer
from kalmanrl.progress import progress
from kalmanrl.prompts import get_template
from kalmanrl.provenance import provenance
from kalmanrl.rewards import get_reward
from kalmanrl.rollout import SamplingConfig, resolve_backend
from kalmanrl.stage import choose_device, encode_prompts, engine_from_settings

log = logging.getLogger(__name__)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_correct(extracted: list[str | None], correct: list[bool]) -> bool:
    """maj@k: the most frequent extracted answer (first seen wins ties; no answer never wins) is correct."""
    votes = Counter(a for a in extracted if a is not None)
    if not votes:
        return False
    winner = max(votes, key=lambda a: (votes[a], -extracted.index(a)))
    return correct[extracted.index(winner)]


def summarise(details: pd.DataFrame, pass_k: list[int]) -> dict[str, float]:
    """Benchmark metrics from per-sample details (one row per problem x sample)."""
    per_problem = details.groupby("problem_id", sort=False)
    n = int(per_problem.size().iloc[0])
    counts = per_problem["correct"].sum()
    majority = [majority_correct(list(g["extracted"]), list(g["correct"])) for _, g in per_problem]
    metrics = {"n_problems": len(counts), "k": n, "n_samples": len(details),
               "avg_at_k": float(details["correct"].mean()), "maj_at_k": float(np.mean(majority)),
               "mean_length": float(details["num_tokens"].mean()),
               "truncation_rate": float((details["finish_reason"] == "length").mean())}
    for k in pass_k:
        metrics[f"pass_at_{k}"] = float(sum(pass_at_k(n, int(c), k) for c in counts) / len(counts))
    return metrics


def command_line(model_dir: str | Path, dataset: str | Path, settings: dict) -> str:
    """The `kalmanrl evaluate` call that reproduces one summary row, shell-quoted (outputs to the working directory)."""
    return shlex.join(["kalmanrl", "evaluate", "--settings", json.dumps(settings, sort_keys=True), "--model",
                       str(model_dir), "--dataset", str(dataset), "--details", "details.parquet", "--summary",
                       "summary.parquet"])


def evaluate(model_dir: str | Path, dataset: str | Path, *, settings: dict, out_details: str | Path,
             out_summary: str | Path) -> dict:
    """Sample settings["evaluate"]["k"] completions per test problem; write details and the summary row."""
    cfg, benchmark, ident = settings["evaluate"], settings["benchmark"], settings["ident"]
    rollout = settings["rollout"]
    # vLLM loads its own copy of the weights and is the only user of the GPU here: no torch policy, and the
    # engine gets the memory a training job would have shared with the policy.
    vllm = resolve_backend(rollout["backend"]) == "vllm"
    if vllm:
        policy, tokenizer = None, load_tokenizer(model_dir)
    else:
        policy, tokenizer = load_policy(model_dir, device=choose_device())
        policy.eval()
    problems = read_dataset(dataset, split="test").to_pandas()
    if cfg["max_problems"]:
        problems = problems.iloc[:cfg["max_problems"]]
    template = get_template(benchmark["template"])
    prompt_ids = encode_prompts(tokenizer, template, problems["problem"])
    sampling = dict(n=cfg["k"], temperature=cfg["temperature"], top_p=cfg["top_p"], max_tokens=cfg["max_tokens"])
    completions = []
    overrides = {"gpu_memory_utilization": rollout["eval_gpu_memory_utilization"]} if vllm else {}
    with engine_from_settings(rollout, policy=policy, tokenizer=tokenizer, model_dir=model_dir,
                              dtype=settings["model"]["dtype"], **overrides) as engine:
        for start in progress(range(0, len(prompt_ids), cfg["batch_size"]), desc=f"evaluate {ident['benchmark']}",
                          unit="batch"):
            batch = prompt_ids[start:start + cfg["batch_size"]]
            completions += engine.generate(batch, SamplingConfig(**sampling, seed=cfg["seed"] + start))

    flat = [c for group in completions for c in group]
    golds = [g for g in problems["answer"] for _ in range(cfg["k"])]
    with get_reward(benchmark["reward"], **benchmark["reward_params"]) as reward:
        verdicts = reward.judge([c.text for c in flat], golds)
    step = ident["step"]
    details = pd.DataFrame({
        **{key: [ident.get(key)] * len(flat) for key in ("model", "task", "algorithm", "seed", "benchmark")},
        "step": step, "problem_id": [p for p in problems["id"] for _ in range(cfg["k"])],
        "sample_index": [i for _ in range(len(problems)) for i in range(cfg["k"])],
        "completion": [c.text for c in flat], "extracted": [v.extracted for v in verdicts],
        "reward": [v.reward for v in verdicts], "correct": [v.correct for v in verdicts],
        "num_tokens": [len(c.token_ids) for c in flat], "finish_reason": [c.finish_reason for c in flat]})
    details["seed"] = details["seed"].astype("Int64")
    details["step"] = details["step"].astype("Int64")
    summary = {**{key: ident.get(key) for key in ("model", "task", "algorithm", "seed", "benchmark")}, "step": step,
               **summarise(details, cfg["pass_k"]), **{f"sampling_{k}": v for k, v in sampling.items()},
               "rollout_backend": rollout["backend"],
               **provenance(config_hash(settings), {"data": [dataset],
                                                    "model": sorted(Path(model_dir).glob("model*.safetensors"))}),
               "command": command_line(model_dir, dataset, settings)}
    summary_frame = pd.DataFrame([summary]).astype({"seed": "Int64", "step": "Int64"})
    write_parquet(details, out_details)
    write_parquet(summary_frame, out_summary)
    log.info("%s on %s: avg@%d %.3f", ident.get("algorithm"), ident.get("benchmark"), cfg["k"], summary["avg_at_k"])
    return summary
