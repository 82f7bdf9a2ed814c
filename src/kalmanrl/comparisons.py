"""The report's numbers: avg@k per (model, task, benchmark, algorithm) with its interval, and every comparison
(each algorithm against GRPO and against the warm start) as a paired difference over seeds and problems."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kalmanrl.results import BASELINE, CELL, RUN, WARM_START, correctness_matrix, select
from kalmanrl.stats import Interval, bootstrap


def accuracy_table(summary: pd.DataFrame, details: pd.DataFrame, expected: pd.DataFrame, *, samples: int,
                   confidence: float) -> pd.DataFrame:
    """One row per (model, task, benchmark, algorithm) expected or found: avg@k with its bootstrap interval over
    seeds and problems, the other metrics averaged over seeds, and seeds done / expected. Missing cells are NaN."""
    runs = pd.concat([expected, summary.reindex(columns=[*RUN, "benchmark"])]).drop_duplicates()
    rows = []
    for (model, task, benchmark, algorithm), group in runs.groupby([*CELL, "algorithm"], sort=False):
        key = {"model": model, "task": task, "benchmark": benchmark, "algorithm": algorithm}
        part = select(summary, key)
        row = {**key, "step": part["step"].max() if len(part) else np.nan,
               "seeds": f"{part['seed'].nunique()}/{group['seed'].nunique()}"}
        row.update({c: part[c].mean() if len(part) else np.nan for c in summary.columns
                    if c.startswith("pass_at_") or c in ("maj_at_k", "mean_length", "truncation_rate")})
        matrix = correctness_matrix(select(details, key)) if len(details) else pd.DataFrame()
        interval = (bootstrap([matrix.to_numpy(float)], samples=samples, confidence=confidence) if matrix.size
                    else Interval(part["avg_at_k"].mean() if len(part) else np.nan, np.nan, np.nan))
        rows.append({**row, "avg_at_k": interval.mean, "avg_at_k_low": interval.low, "avg_at_k_high": interval.high})
    table = pd.DataFrame(rows)
    order = {WARM_START: 0, BASELINE: 1}
    rank = table["algorithm"].map(lambda a: f"{order.get(a, 2)}{a}")
    return table.assign(rank=rank).sort_values([*CELL, "rank"]).drop(columns="rank").reset_index(drop=True)


def comparisons(algorithms: set[str]) -> list[tuple[str, str]]:
    """(algorithm, reference) pairs: every algorithm against GRPO, and every RL algorithm against the warm start."""
    pairs = [(a, BASELINE) for a in sorted(algorithms - {BASELINE, WARM_START}) if BASELINE in algorithms]
    return pairs + [(a, WARM_START) for a in sorted(algorithms - {WARM_START}) if WARM_START in algorithms]


def paired_differences(details: pd.DataFrame, *, samples: int, confidence: float) -> pd.DataFrame:
    """avg@k(algorithm) - avg@k(reference) per cell, paired by seed and problem, with a hierarchical bootstrap
    interval. The warm start has one row (no seed): against it the pairing is by problem, its row shared by all
    seeds."""
    rows = []
    if details.empty:
        return pd.DataFrame(rows)
    for cell, cell_details in details.groupby(CELL):
        for algorithm, reference in comparisons(set(cell_details["algorithm"])):
            other = correctness_matrix(cell_details[cell_details["algorithm"] == algorithm])
            base = correctness_matrix(cell_details[cell_details["algorithm"] == reference])
            if reference == WARM_START:
                base = pd.DataFrame(np.repeat(base.to_numpy(), len(other), axis=0), index=other.index,
                                    columns=base.columns)
            seeds = other.index.intersection(base.index)
            problems = other.columns.intersection(base.columns)
            if seeds.empty or problems.empty:
                continue
            interval = bootstrap([frame.loc[seeds, problems].to_numpy(float) for frame in (other, base)],
                                 samples=samples, confidence=confidence)
            rows.append({**dict(zip(CELL, cell)), "comparison": f"{algorithm} - {reference}", "seeds": len(seeds),
                         "problems": len(problems), "difference": interval.mean, "low": interval.low,
                         "high": interval.high})
    return pd.DataFrame(rows)
