"""The report: bootstrap intervals behave, paired differences are paired, partial grids are marked, and the HTML
renders in a real headless Chromium with its tables and figures."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from kalmanrl.io import write_parquet
from kalmanrl.report import bootstrap, build_report, paired_differences

SETTINGS = {"report": {"bootstrap_samples": 500, "confidence": 0.95}}


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_more_problems():
    rng = np.random.default_rng(0)
    small, large = (rng.random((3, n)) < 0.4 for n in (20, 2000))
    a, b = (bootstrap([m.astype(float)], samples=500, confidence=0.95) for m in (small, large))
    assert a.low <= a.mean <= a.high and b.low <= b.mean <= b.high
    assert b.high - b.low < a.high - a.low


def test_difference_of_identical_results_is_exactly_zero():
    m = (np.random.default_rng(1).random((3, 50)) < 0.5).astype(float)
    interval = bootstrap([m, m.copy()], samples=200, confidence=0.95)
    assert interval.mean == interval.low == interval.high == 0


def _details(algorithm: str, seed: int | None, accuracy: float, problems: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(hash((algorithm, seed)) % 2**32)
    return pd.DataFrame({"model": "tiny", "task": "arith", "benchmark": "arith", "algorithm": algorithm,
                         "seed": pd.array([seed] * problems * 2, dtype="Int64"), "step": 0,
                         "problem_id": [f"p{i}" for i in range(problems) for _ in range(2)],
                         "sample_index": [j for _ in range(problems) for j in range(2)],
                         "correct": rng.random(problems * 2) < accuracy})


def _write_run(root, algorithm, seed, accuracy):
    details = _details(algorithm, seed, accuracy)
    base = root / f"{algorithm}-{seed}"
    write_parquet(details, f"{base}.details.parquet")
    summary = details.groupby(["model", "task", "benchmark", "algorithm"]).agg(
        avg_at_k=("correct", "mean")).reset_index().assign(seed=pd.array([seed], dtype="Int64"), pass_at_1=0.1,
                                                          git_commit="abc", version_torch="2.13.0")
    write_parquet(summary, f"{base}.summary.parquet")
    metrics = pd.DataFrame({"model": "tiny", "task": "arith", "algorithm": algorithm, "seed": seed,
                            "step": [1, 2, 3], "reward_mean": [0.1, 0.2, accuracy], "accuracy": [0.1, 0.2, 0.3]})
    write_parquet(metrics, root / f"{algorithm}-{seed}.metrics.parquet")
    return f"{base}.summary.parquet", root / f"{algorithm}-{seed}.metrics.parquet"


def test_paired_difference_is_positive_when_an_algorithm_is_better():
    details = pd.concat([_details("grpo", s, 0.2, 400) for s in (0, 1)] + [_details("kpo", s, 0.6, 400) for s in (0, 1)])
    table = paired_differences(details, samples=300, confidence=0.95)
    row = table.iloc[0]
    assert row["comparison"] == "kpo - grpo" and row["low"] > 0.3 and row["seeds"] == 2


@pytest.fixture
def report_dir(tmp_path):
    runs = [_write_run(tmp_path, a, s, acc) for a, s, acc in
            [("grpo", 0, 0.3), ("grpo", 1, 0.35), ("krpo", 0, 0.5), ("krpo", 1, 0.45)]]
    summaries = [s for s, _ in runs] + [str(tmp_path / "kpo-0.summary.parquet")]  # still running
    out = tmp_path / "report"
    build_report(summaries, [m for _, m in runs], out, settings=SETTINGS)
    return out


def test_report_aggregates_and_marks_missing_cells(report_dir):
    summary = pd.read_parquet(report_dir / "summary.parquet")
    assert len(summary) == 4
    markdown = (report_dir / "report.md").read_text()
    assert "Partial results" in markdown and "krpo - grpo" in markdown
    assert "How to reproduce this" in markdown and "Published numbers" in markdown
    assert (report_dir / "figures" / "reward_mean.png").stat().st_size > 1000


def test_html_report_renders_in_headless_chromium(report_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    screenshot = tmp_path / "page.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    page = f"file://{report_dir / 'report.html'}"
    dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<table") >= 3 and "data:image/png;base64" in dom and "Differences to GRPO" in dom
    subprocess.run([chromium, *flags, f"--screenshot={screenshot}", "--window-size=1280,1600", page],
                   capture_output=True, timeout=120)
    assert screenshot.stat().st_size > 10_000
