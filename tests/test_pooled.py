"""report.pooled_benchmarks: the benchmark "all" pools a run's benchmarks as the KPO authors' verl logs do, every
problem weighed the same (so not the mean of the benchmarks' means), and leaves every other row as it was."""

from __future__ import annotations

import pandas as pd
import pytest

from kalmanrl.core.io import write_parquet
from kalmanrl.reporting.comparisons import POOLED, accuracy_table, paired_differences, with_pooled_benchmark
from kalmanrl.reporting.metrics import summarise
from kalmanrl.reporting.report import build_report
from kalmanrl.reporting.results import NO_SEED

# Per run, per benchmark, per problem: the correctness of its 2 samples. "small" has 2 problems, "large" 3.
CORRECT = {
    ("sft", NO_SEED): {"small": [[1, 0], [0, 0]], "large": [[0, 0], [0, 0], [1, 0]]},
    ("grpo", 0): {"small": [[1, 1], [1, 0]], "large": [[0, 0], [1, 0], [0, 0]]},
    ("grpo", 1): {"small": [[1, 1], [0, 1]], "large": [[0, 1], [0, 0], [1, 0]]},
    ("kpo", 0): {"small": [[1, 1], [1, 1]], "large": [[0, 0], [1, 1], [0, 1]]},
    ("kpo", 1): {"small": [[1, 1], [1, 1]], "large": [[1, 0], [0, 1], [1, 1]]},
}
# Hand-computed over the 5 pooled problems (10 samples) and averaged over seeds.
POOLED_AVG = {"sft": 2 / 10, "grpo": (4 / 10 + 5 / 10) / 2, "kpo": (7 / 10 + 8 / 10) / 2}
POOLED_PASS_AT_2 = {"sft": 2 / 5, "grpo": (3 / 5 + 4 / 5) / 2, "kpo": (4 / 5 + 5 / 5) / 2}
SETTINGS = {"bootstrap_samples": 200, "confidence": 0.95, "alpha": 0.05, "power": 0.8, "detect": []}


def _details(algorithm: str, seed: int, benchmark: str) -> pd.DataFrame:
    """One evaluation's details as the evaluate stage writes them."""
    problems = CORRECT[(algorithm, seed)][benchmark]
    correct = [bool(c) for samples in problems for c in samples]
    return pd.DataFrame({"model": "m", "task": "t", "algorithm": algorithm, "seed": seed, "benchmark": benchmark,
                         "step": 0 if algorithm == "sft" else 10,
                         "problem_id": [f"p{i}" for i, samples in enumerate(problems) for _ in samples],
                         "sample_index": [j for samples in problems for j in range(len(samples))],
                         "extracted": ["1" if c else "2" for c in correct], "reward": [float(c) for c in correct],
                         "correct": correct, "num_tokens": 10, "finish_reason": "stop"})


def _summary(details: pd.DataFrame) -> dict:
    """One evaluation's summary row, as the evaluate stage computes it."""
    first = details.iloc[0]
    return {**first[["model", "task", "algorithm", "seed", "benchmark", "step"]].to_dict(),
            **summarise(details, [1, 2], extra_metrics=["verl_best_at_k"])}


@pytest.fixture(scope="module")
def frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(summary, details, expected) of the grid, as build_report hands them to the tables."""
    evaluations = [_details(a, s, b) for a, s in CORRECT for b in ("small", "large")]
    summary = pd.DataFrame([_summary(d) for d in evaluations])
    expected = summary[["model", "task", "algorithm", "seed", "benchmark"]]
    return summary, pd.concat(evaluations, ignore_index=True), expected


def test_pooled_row_weighs_every_problem_the_same(frames):
    summary, details, expected = frames
    table = accuracy_table(*with_pooled_benchmark(summary, details, expected), samples=200, confidence=0.95)
    pooled = table[table["benchmark"] == POOLED].set_index("algorithm")
    assert sorted(pooled.index) == ["grpo", "kpo", "sft"]
    for algorithm, avg in POOLED_AVG.items():
        assert pooled.loc[algorithm, "avg_at_k"] == pytest.approx(avg)
        assert pooled.loc[algorithm, "pass_at_1"] == pytest.approx(avg)
        assert pooled.loc[algorithm, "pass_at_2"] == pytest.approx(POOLED_PASS_AT_2[algorithm])
        assert pooled.loc[algorithm, "avg_at_k_low"] <= avg <= pooled.loc[algorithm, "avg_at_k_high"]
    per_benchmark = table[table["benchmark"] != POOLED].groupby("algorithm")["avg_at_k"].mean()
    assert per_benchmark["grpo"] != pytest.approx(POOLED_AVG["grpo"])  # not the mean of the benchmarks' means


def test_pooled_summary_is_the_benchmarks_summaries_weighted_by_their_problems(frames):
    """verl's best@k too: its bootstrap draws are the same for every problem with the same number of samples."""
    summary, details, expected = frames
    pooled_summary, pooled_details, _ = with_pooled_benchmark(summary, details, expected)
    row = pooled_summary[(pooled_summary["benchmark"] == POOLED) & (pooled_summary["algorithm"] == "grpo")
                         & (pooled_summary["seed"] == 0)].iloc[0]
    parts = summary[(summary["algorithm"] == "grpo") & (summary["seed"] == 0)]
    assert row["n_problems"] == 5 and row["step"] == 10
    for metric in ("avg_at_k", "pass_at_2", "verl_best_at_2"):
        assert row[metric] == pytest.approx((parts[metric] * parts["n_problems"]).sum() / 5)
    ids = pooled_details.loc[pooled_details["benchmark"] == POOLED, "problem_id"]
    assert set(ids) == {"small/p0", "small/p1", "large/p0", "large/p1", "large/p2"}


def test_pooling_leaves_every_benchmarks_rows_as_they_were(frames):
    summary, details, expected = frames
    pooled = with_pooled_benchmark(summary, details, expected)
    before = accuracy_table(summary, details, expected, samples=200, confidence=0.95)
    after = accuracy_table(*pooled, samples=200, confidence=0.95)
    pd.testing.assert_frame_equal(after[after["benchmark"] != POOLED].reset_index(drop=True), before)
    differences = paired_differences(pooled[1], samples=200, confidence=0.95)
    pd.testing.assert_frame_equal(differences[differences["benchmark"] != POOLED].reset_index(drop=True),
                                  paired_differences(details, samples=200, confidence=0.95))
    compared = differences[differences["benchmark"] == POOLED].set_index("comparison")
    assert sorted(compared.index) == ["grpo - sft", "kpo - grpo", "kpo - sft"] and (compared["problems"] == 5).all()
    assert compared.loc["kpo - grpo", "difference"] == pytest.approx(POOLED_AVG["kpo"] - POOLED_AVG["grpo"])


def test_a_run_missing_a_benchmark_has_no_pooled_row_yet(frames):
    summary, details, expected = frames
    unfinished = (details["algorithm"] == "kpo") & (details["seed"] == 1) & (details["benchmark"] == "large")
    finished = ~((summary["algorithm"] == "kpo") & (summary["seed"] == 1) & (summary["benchmark"] == "large"))
    table = accuracy_table(*with_pooled_benchmark(summary[finished], details[~unfinished], expected), samples=200,
                           confidence=0.95)
    kpo = table[(table["benchmark"] == POOLED) & (table["algorithm"] == "kpo")].iloc[0]
    assert kpo["seeds"] == "1/2" and kpo["avg_at_k"] == pytest.approx(7 / 10)


def test_pooling_refuses_a_benchmark_already_named_like_the_pooled_one(frames):
    summary, details, expected = frames
    with pytest.raises(ValueError, match="report.pooled_benchmarks: a benchmark is already named 'all'"):
        with_pooled_benchmark(summary, details.assign(benchmark=POOLED), expected)


def _write_grid(root) -> list:
    """The grid's summaries and details in the results tree; the summary paths."""
    paths = []
    for algorithm, seed in CORRECT:
        run = root / "eval" / "m" / "t" / ("sft" if algorithm == "sft" else f"{algorithm}/seed{seed}")
        for benchmark in ("small", "large"):
            details = _details(algorithm, seed, benchmark)
            details["seed"] = pd.array([None if seed == NO_SEED else seed] * len(details), dtype="Int64")
            write_parquet(details, run / f"{benchmark}.details.parquet")
            write_parquet(pd.DataFrame([_summary(details)]).astype({"seed": "Int64"}),
                          run / f"{benchmark}.summary.parquet")
            paths.append(run / f"{benchmark}.summary.parquet")
    return paths


def test_report_has_the_pooled_rows_only_when_asked(tmp_path):
    summaries = _write_grid(tmp_path)
    for pooled in (False, True):
        build_report(summaries, [], tmp_path / f"report-{pooled}",
                     settings={"report": {**SETTINGS, "pooled_benchmarks": pooled}})
    off, on = ({name: pd.read_parquet(tmp_path / f"report-{pooled}" / f"{name}.parquet")
                for name in ("accuracy", "comparisons")} for pooled in (False, True))
    assert POOLED not in set(off["accuracy"]["benchmark"]) | set(off["comparisons"]["benchmark"])
    pd.testing.assert_frame_equal(on["accuracy"][on["accuracy"]["benchmark"] != POOLED].reset_index(drop=True),
                                  off["accuracy"])
    assert on["accuracy"].loc[on["accuracy"]["benchmark"] == POOLED, "avg_at_k"].tolist() == pytest.approx(
        [POOLED_AVG["sft"], POOLED_AVG["grpo"], POOLED_AVG["kpo"]])
    tested = ["difference", "low", "high", "p_value"]
    kept = on["comparisons"][on["comparisons"]["benchmark"] != POOLED].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept[tested], off["comparisons"][tested])
    assert len(on["comparisons"]) == len(off["comparisons"]) + 3  # the pooled comparisons join the Holm family
    assert (on["comparisons"]["level"] == 0.05 / len(on["comparisons"])).all()
    markdown = (tmp_path / "report-True" / "report.md").read_text()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]
    assert 'Benchmark "all" pools every benchmark' in markdown and ["m", "t", POOLED, "kpo"] in [c[:4] for c in cells]
    assert "pools every benchmark" not in (tmp_path / "report-False" / "report.md").read_text()


def test_the_pooled_rows_come_after_the_benchmarks_they_pool(frames):
    """"all" sorts before "large" and "small" by name; the tables put it last in its model and task."""
    summary, details, expected = with_pooled_benchmark(*frames)
    table = accuracy_table(summary, details, expected, samples=50, confidence=0.95)
    assert list(dict.fromkeys(table["benchmark"])) == ["large", "small", POOLED]
    assert table[table["benchmark"] == POOLED]["algorithm"].tolist() == ["sft", "grpo", "kpo"]
    differences = paired_differences(details, samples=50, confidence=0.95)
    assert list(dict.fromkeys(differences["benchmark"])) == ["large", "small", POOLED]
