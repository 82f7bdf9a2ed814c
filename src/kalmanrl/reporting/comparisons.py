"""The report's numbers: avg@k per (model, task, benchmark, algorithm) with its interval, and every comparison
(each algorithm against GRPO and against the warm start) as a paired difference over seeds and problems; optionally
one more benchmark that pools all of a run's benchmarks (report.pooled_benchmarks)."""

from __future__ import annotations

import functools
import re

import numpy as np
import pandas as pd

from kalmanrl.core.layout import WARM_START
from kalmanrl.reporting.metrics import EXTRA_METRICS, majority_correct, pass_at_k, summarise
from kalmanrl.reporting.results import BASELINE, CELL, RUN, correctness_matrix, select
from kalmanrl.reporting.stats import (
    GridVariance,
    Interval,
    bootstrap,
    detectable_difference,
    holm,
    paired_test,
    seeds_needed,
)

POOLED = "all"  # the benchmark report.pooled_benchmarks adds


def _problem_pass_at_k(group: pd.DataFrame, k: int) -> float:
    """pass@k of one problem from its samples: how many there are and how many are correct."""
    return pass_at_k(len(group), int(group["correct"].sum()), k)


def problem_matrices(details: pd.DataFrame, metrics: list[str]) -> dict[str, pd.DataFrame]:
    """Seeds x problems matrices [S, P] of each summary metric that is a mean over problems (avg_at_k, pass_at_<k>,
    maj_at_k, mean_length, truncation_rate), so that each gets its interval the same way. A metric the details
    cannot give per problem (its column absent, or pass@k with fewer than k samples) has no matrix."""
    samples = int(details.groupby(["seed", "problem_id"]).size().min())
    per_problem = {("maj_at_k", "extracted"): lambda g: float(majority_correct(list(g["extracted"]),
                                                                               list(g["correct"]))),
                   ("mean_length", "num_tokens"): lambda g: g["num_tokens"].mean(),
                   ("truncation_rate", "finish_reason"): lambda g: (g["finish_reason"] == "length").mean()}
    pass_ks = {m: int(m.removeprefix("pass_at_")) for m in metrics if m.startswith("pass_at_")}
    per_problem.update({(m, "correct"): functools.partial(_problem_pass_at_k, k=k)
                        for m, k in pass_ks.items() if k <= samples})
    groups = details.groupby(["seed", "problem_id"], sort=True)
    matrices = {metric: groups.apply(function, include_groups=False).unstack("problem_id")
                for (metric, column), function in per_problem.items() if metric in metrics and column in details}
    return {"avg_at_k": correctness_matrix(details), **matrices} if "avg_at_k" in metrics else matrices


def with_pooled_benchmark(summary: pd.DataFrame, details: pd.DataFrame,
                          expected: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(summary, details, expected) with one more benchmark, POOLED, per run and step: the problems of all its
    benchmarks as one (ids "<benchmark>/<problem_id>"), summarised as any benchmark is, so every problem weighs the
    same and a larger benchmark more. That is what the KPO authors' verl logs report: their test rows share one
    data_source, and verl averages validation metrics per data_source. A run's pooled row waits until every
    benchmark it expects has been evaluated at one step, so it never covers part of the problems."""
    if POOLED in set(details.get("benchmark", [])):
        raise ValueError(f"report.pooled_benchmarks: a benchmark is already named {POOLED!r}")
    wanted = pd.concat([expected, summary.reindex(columns=[*RUN, "benchmark"])]).groupby(RUN)["benchmark"].agg(set)
    pooled_details, pooled_summary = [], []
    for (*run, step), group in details.groupby([*RUN, "step"]) if len(details) else []:
        if set(group["benchmark"]) != wanted.get(tuple(run)):
            continue
        key = dict(zip(RUN, run, strict=True))
        problems = group.assign(benchmark=POOLED, problem_id=group["benchmark"] + "/" + group["problem_id"].astype(str))
        pass_k, extra_metrics = summary_metrics(select(summary, {**key, "step": step}))
        try:
            metrics = summarise(problems, pass_k, extra_metrics=extra_metrics)
        except ValueError as err:
            raise ValueError(f"report.pooled_benchmarks: {'/'.join(map(str, run))} step {step}: {err}") from err
        pooled_details.append(problems)
        pooled_summary.append({**key, "benchmark": POOLED, "step": step, **metrics})
    pooled_expected = wanted.index.to_frame(index=False).assign(benchmark=POOLED)
    return (pd.concat([summary, pd.DataFrame(pooled_summary)], ignore_index=True) if pooled_summary else summary,
            pd.concat([details, *pooled_details], ignore_index=True),
            pd.concat([expected, pooled_expected], ignore_index=True))


def summary_metrics(rows: pd.DataFrame) -> tuple[list[int], list[str]]:
    """The pass_k and extra_metrics (metrics.summarise) that every one of the summary rows `rows` was computed with,
    read off the columns they all fill."""
    filled = rows.columns[rows.notna().all()]
    pass_k = [int(c.removeprefix("pass_at_")) for c in filled if re.fullmatch(r"pass_at_\d+", c)]
    extra_metrics = [m for m in EXTRA_METRICS if any(re.fullmatch(m.replace("_at_k", r"_at_\d+"), c) for c in filled)]
    return pass_k, extra_metrics


def accuracy_table(summary: pd.DataFrame, details: pd.DataFrame, expected: pd.DataFrame, *, samples: int,
                   confidence: float) -> pd.DataFrame:
    """One row per (model, task, benchmark, algorithm) expected or found: avg@k and the other metrics averaged over
    seeds, each with its bootstrap interval over seeds and problems (<metric>_low, <metric>_high), and seeds done /
    expected. Missing cells are NaN. avg@k is its interval's point, the mean over (seed, problem) cells: the seeds'
    mean on a complete grid, each evaluated cell weighing the same where a seed lacks problems; the other metrics
    are the mean of the seeds' summary rows."""
    runs = pd.concat([expected, summary.reindex(columns=[*RUN, "benchmark"])]).drop_duplicates()
    metrics = [c for c in summary.columns if c.startswith("pass_at_") or c in ("maj_at_k", "mean_length",
                                                                               "truncation_rate")]
    rows = []
    for (model, task, benchmark, algorithm), group in runs.groupby([*CELL, "algorithm"], sort=False):
        key = {"model": model, "task": task, "benchmark": benchmark, "algorithm": algorithm}
        part = select(summary, key)
        row = {**key, "step": part["step"].max() if len(part) else np.nan,
               "seeds": f"{part['seed'].nunique()}/{group['seed'].nunique()}"}
        cell_details = select(details, key) if len(details) else pd.DataFrame()
        matrices = problem_matrices(cell_details, ["avg_at_k", *metrics]) if len(cell_details) else {}
        for metric in ["avg_at_k", *metrics]:
            mean = part[metric].mean() if len(part) else np.nan
            try:
                interval = (bootstrap([matrices[metric].to_numpy(float)], samples=samples, confidence=confidence)
                            if metric in matrices else Interval(mean, np.nan, np.nan))
            except ValueError as err:
                raise ValueError(f"{model}/{task}/{benchmark} {algorithm} {metric}: {err}") from err
            row.update({metric: interval.mean if metric == "avg_at_k" else mean,
                        f"{metric}_low": interval.low, f"{metric}_high": interval.high})
        rows.append(row)
    table = pd.DataFrame(rows)
    order = {WARM_START: 0, BASELINE: 1}
    rank = table["algorithm"].map(lambda a: f"{order.get(a, 2)}{a}")
    return _in_cell_order(table.assign(rank=rank), "rank").drop(columns="rank")


def _in_cell_order(table: pd.DataFrame, *then: str) -> pd.DataFrame:
    """`table`'s rows by model, task and benchmark, the pooled benchmark after the ones it pools, then by `then`
    (a stable sort: rows that tie keep their order)."""
    pooled = table["benchmark"].eq(POOLED)
    return (table.assign(pooled_last=pooled).sort_values(["model", "task", "pooled_last", "benchmark", *then],
                                                          kind="stable")
            .drop(columns="pooled_last").reset_index(drop=True))


def comparisons(algorithms: set[str]) -> list[tuple[str, str]]:
    """(algorithm, reference) pairs: every algorithm against GRPO, and every RL algorithm against the warm start."""
    pairs = [(a, BASELINE) for a in sorted(algorithms - {BASELINE, WARM_START}) if BASELINE in algorithms]
    return pairs + [(a, WARM_START) for a in sorted(algorithms - {WARM_START}) if WARM_START in algorithms]


def paired_differences(details: pd.DataFrame, *, samples: int, confidence: float) -> pd.DataFrame:
    """avg@k(algorithm) - avg@k(reference) per cell, paired by seed and problem, with a hierarchical bootstrap
    interval and the paired test (stats.paired_test: seeds and problems both random) with its mean squares. The warm
    start has one row (no seed): against it the pairing is by problem, its row shared by all seeds. The test uses
    the problems every seed of both runs evaluated."""
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
            matrices = [frame.loc[seeds, problems].to_numpy(float) for frame in (other, base)]
            name = f"{algorithm} - {reference}"
            differences = matrices[0] - matrices[1]
            try:
                interval = bootstrap(matrices, samples=samples, confidence=confidence)
                test = paired_test(differences[:, ~np.isnan(differences).any(axis=0)])
            except ValueError as err:
                raise ValueError(f"{'/'.join(map(str, cell))} {name}: {err}") from err
            rows.append({**dict(zip(CELL, cell, strict=True)), "comparison": name, "seeds": len(seeds),
                         "problems": len(problems), "difference": interval.mean, "low": interval.low,
                         "high": interval.high, "p_value": test.p_value, "tested_problems": test.variance.problems,
                         "ms_seed": test.variance.ms_seed, "ms_problem": test.variance.ms_problem,
                         "ms_residual": test.variance.ms_residual})
    return _in_cell_order(pd.DataFrame(rows)) if rows else pd.DataFrame(rows)


def grid_variance(row: pd.Series) -> GridVariance:
    """The paired test's mean squares of one row of paired_differences."""
    return GridVariance(int(row["seeds"]), int(row["tested_problems"]), row["ms_seed"], row["ms_problem"],
                        row["ms_residual"])


def family_tests(table: pd.DataFrame, *, alpha: float, power: float) -> pd.DataFrame:
    """The report's comparisons as one family: Holm-adjusted p-values (significant where at most alpha), and for each
    grid the smallest difference it detects with `power` at the Bonferroni level alpha / m (Holm never asks for
    less, so each comparison has at least that power under Holm), and the seeds a grid would need to detect the
    observed difference (same problems and k)."""
    if table.empty:
        return table
    level = alpha / len(table)
    table = table.assign(p_holm=holm(table["p_value"].to_numpy(float)), level=level)
    return table.assign(detectable=[detectable_difference(grid_variance(row), alpha=level, power=power)
                                    for _, row in table.iterrows()],
                        seeds_for_observed=seeds_for(table, table["difference"], power=power))


def seeds_for(table: pd.DataFrame, differences, *, power: float) -> list[int | None]:
    """Per row of family_tests' table, the seeds its grid would need to detect that row's entry of `differences`
    (None or NaN: nothing to detect) with `power` at the row's level."""
    return [seeds_needed(grid_variance(row), float(d), alpha=row["level"], power=power)
            if d is not None and pd.notna(d) else None
            for (_, row), d in zip(table.iterrows(), differences, strict=True)]
