"""Benchmark metrics from per-sample evaluation details: avg@k, unbiased pass@k, maj@k, lengths, truncation, and the
papers' own scores as extra labelled columns, so a published number is compared with the metric that produced it.

- `verl_best_at_{k}`: verl's best@k (the KPO authors' pass@k): per problem, the mean over 1,000 bootstrap draws of k
  samples *with replacement* of the best score, averaged over problems (verl/trainer/ppo/metric_utils.py,
  `bootstrap_metric` and `process_validation_metrics`, seed 42, the same draws for every problem with the same number
  of samples). Drawing with replacement repeats samples, so it comes out below the unbiased pass@k.
- `krpo_summed_reward`: the KRPO authors' evaluation score (billhhh/KRPO_LLMs_RL eval.py:381-418): the sum of the
  rewards (partial credit 0.5 / 0.01 included) of one batch of 32 prompts x k samples, averaged over batches; here
  its expectation over their shuffled batches, 32 * k * the mean reward (their loader also drops a last partial
  batch, drop_last=True, which only changes which problems count).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

EXTRA_METRICS = ("verl_best_at_k", "krpo_summed_reward")
VERL_BOOTSTRAP_DRAWS = 1000   # metric_utils.py: n_bootstrap = 1000
VERL_BOOTSTRAP_SEED = 42      # metric_utils.py: process_validation_metrics(..., seed=42)
KRPO_PROMPTS_PER_BATCH = 32   # eval.py:278, rollouts_per_step = 32


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n = {n} samples")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: {c} correct of {n} samples is impossible")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_correct(extracted: list[str | None], correct: list[bool]) -> bool:
    """maj@k: the most frequent extracted answer (first seen wins ties; no answer never wins) is correct. It is when
    any of its samples was judged correct: samples of one answer differ only where one hit a reward limit (time,
    memory) and scored 0 unjudged, which says nothing of the answer."""
    votes = Counter(a for a in extracted if a is not None)
    if not votes:
        return False
    winner = max(votes, key=lambda a: (votes[a], -extracted.index(a)))
    return any(right for answer, right in zip(extracted, correct, strict=True) if answer == winner)


def bootstrap_indices(n: int, k: int, *, draws: int = VERL_BOOTSTRAP_DRAWS,
                      seed: int = VERL_BOOTSTRAP_SEED) -> np.ndarray:
    """verl's bootstrap draws [draws, k] of sample indices 0..n-1 with replacement: numpy's legacy generator seeded
    with `seed`, `choice(n, size=(draws, k), replace=True)` (what `np.random.seed(seed)` then `np.random.choice`
    gives, without touching numpy's global state)."""
    return np.random.RandomState(seed).choice(n, size=(draws, k), replace=True)


def verl_best_at_k(scores: np.ndarray, k: int, *, draws: int = VERL_BOOTSTRAP_DRAWS,
                   seed: int = VERL_BOOTSTRAP_SEED) -> float:
    """verl's best@k/mean: scores [P, n] (P problems, n samples each) -> mean over problems of the mean over the
    bootstrap draws of the best of k scores drawn with replacement."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [problems, samples], got shape {scores.shape}")
    index = bootstrap_indices(scores.shape[1], k, draws=draws, seed=seed)
    return float(scores[:, index].max(axis=-1).mean())


def krpo_summed_reward(rewards: Iterable[float], k: int) -> float:
    """The KRPO authors' score: the expected sum of the rewards of a batch of 32 prompts x k samples."""
    return KRPO_PROMPTS_PER_BATCH * k * float(np.mean(list(rewards)))


def summarise(details: pd.DataFrame, pass_k: Sequence[int], *,
              extra_metrics: Sequence[str] = ()) -> dict[str, float]:
    """Benchmark metrics from per-sample details (one row per problem x sample, in sample order); `extra_metrics`
    adds the papers' scores (EXTRA_METRICS; see the module docstring): verl_best_at_{k} for each k >= 2 of pass_k
    (verl reports no best@1), krpo_summed_reward."""
    if unknown := sorted(set(extra_metrics) - set(EXTRA_METRICS)):
        raise ValueError(f"unknown extra metrics {unknown}; known: {', '.join(EXTRA_METRICS)}")
    per_problem = details.groupby("problem_id", sort=False)
    sizes = per_problem.size()
    n = int(sizes.iloc[0])
    if (sizes != n).any():
        raise ValueError(f"every problem needs the same number of samples; got {sorted(set(sizes))}")
    counts = per_problem["correct"].sum()
    majority = [majority_correct(list(g["extracted"]), list(g["correct"])) for _, g in per_problem]
    metrics = {"n_problems": len(counts), "k": n, "n_samples": len(details),
               "avg_at_k": float(details["correct"].mean()), "maj_at_k": float(np.mean(majority)),
               "mean_length": float(details["num_tokens"].mean()),
               "truncation_rate": float((details["finish_reason"] == "length").mean())}
    for k in pass_k:
        metrics[f"pass_at_{k}"] = float(sum(pass_at_k(n, int(c), k) for c in counts) / len(counts))
    if "verl_best_at_k" in extra_metrics:
        scores = np.stack([g["correct"].to_numpy(dtype=np.float64) for _, g in per_problem])
        for k in pass_k:
            if k >= 2:
                metrics[f"verl_best_at_{k}"] = verl_best_at_k(scores, k)
    if "krpo_summed_reward" in extra_metrics:
        metrics["krpo_summed_reward"] = krpo_summed_reward(details["reward"], n)
    return metrics
