"""The report: differences are paired, published numbers appear only where the
setting matches, partial grids are marked, and the HTML renders in a real headless Chromium with tables and figures."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from kalmanrl.core.io import write_parquet
from kalmanrl.reporting.comparisons import family_tests, paired_differences, problem_matrices
from kalmanrl.reporting.figures import plot_token_noise
from kalmanrl.reporting.published import published_numbers
from kalmanrl.reporting.report import build_report, left_out_table, provenance_table, reproduce_text
from kalmanrl.reporting.results import final_steps, summary_ident
from kalmanrl.reporting.stats import paired_test

SETTINGS = {"report": {"bootstrap_samples": 400, "confidence": 0.95, "alpha": 0.05, "power": 0.8, "detect": [5],
                       "pooled_benchmarks": False},
            "reproduce": {"configfiles": ["config/config.yaml"],
                          "config": {"seeds": [0, 1], "results_dir": "results/study"}}}


def _details(algorithm: str, seed: int, accuracy: float, *, problems: int = 30, benchmark: str = "arith",
             model: str = "tiny", task: str = "arith", step: int = 10) -> pd.DataFrame:
    rng = np.random.default_rng([seed + 1, len(algorithm), problems, int(1000 * accuracy)])
    return pd.DataFrame({"model": model, "task": task, "benchmark": benchmark, "algorithm": algorithm,
                         "seed": seed, "step": step, "problem_id": [f"p{i}" for i in range(problems) for _ in range(2)],
                         "sample_index": [j for _ in range(problems) for j in range(2)],
                         "correct": rng.random(problems * 2) < accuracy})


def test_paired_difference_is_positive_when_an_algorithm_is_better():
    details = pd.concat([_details("grpo", s, 0.2, problems=400) for s in (0, 1)]
                        + [_details("kpo", s, 0.6, problems=400) for s in (0, 1)])
    row = paired_differences(details, samples=300, confidence=0.95).iloc[0]
    assert row["comparison"] == "kpo - grpo" and row["seeds"] == 2 and 0.3 < row["low"] <= row["high"] < 0.5
    assert row["p_value"] < 0.05 and row["tested_problems"] == 400


def test_the_paired_test_leaves_out_a_problem_one_seed_did_not_evaluate():
    """KPO's seed 1 lacks problem p0: the test runs on the 29 problems every seed of both runs has (a missing cell is
    not a difference of 0), with the mean squares of that complete grid."""
    details = pd.concat([_details(a, s, acc) for a, acc in (("grpo", 0.3), ("kpo", 0.6)) for s in (0, 1)])
    details = details[~((details["algorithm"] == "kpo") & (details["seed"] == 1) & (details["problem_id"] == "p0"))]
    row = paired_differences(details, samples=100, confidence=0.95).iloc[0]
    means = details.groupby(["algorithm", "seed", "problem_id"])["correct"].mean()
    complete = [f"p{i}" for i in range(1, 30)]
    grid = np.array([[means["kpo", s, p] - means["grpo", s, p] for p in complete] for s in (0, 1)])
    variance = paired_test(grid).variance
    assert (row["problems"], row["tested_problems"]) == (30, 29)
    assert (row["ms_seed"], row["ms_problem"], row["ms_residual"]) == pytest.approx(
        (variance.ms_seed, variance.ms_problem, variance.ms_residual))


def test_comparisons_are_one_holm_family_with_their_detectable_difference():
    details = pd.concat([_details("sft", -1, 0.3, problems=200)]
                        + [_details(a, s, acc, problems=200) for a, acc in (("grpo", 0.3), ("krpo", 0.32), ("kpo", 0.6))
                           for s in (0, 1, 2)])
    table = family_tests(paired_differences(details, samples=200, confidence=0.95), alpha=0.05, power=0.8)
    assert len(table) == 5 and (table["level"] == 0.05 / 5).all()
    assert (table["p_holm"] >= table["p_value"]).all() and table["p_holm"].max() <= 1
    kpo = table.set_index("comparison").loc["kpo - grpo"]
    assert kpo["p_holm"] < 0.05 and 0 < kpo["detectable"] < kpo["difference"] and kpo["seeds_for_observed"] <= 3


def test_published_difference_gets_the_seeds_it_would_need(tmp_path):
    """A published difference for the grid's setting shows beside ours with the seeds that would detect it."""
    published = tmp_path / "published.yaml"
    published.write_text("- paper: X\n  source: arXiv 0000.00000\n  version: v1\n  table: Table 9\n  checked: paper\n"
                         "  model: tiny\n  task: arith\n"
                         "  differences:\n    - {benchmark: arith, comparison: krpo - grpo, difference: 5.0}\n")
    runs = [_write_run(tmp_path, a, s, acc) for a, acc in (("grpo", 0.3), ("krpo", 0.4)) for s in (0, 1, 2)]
    build_report([s for s, _ in runs], [m for _, m in runs], tmp_path / "report", settings=SETTINGS,
                 published=published)
    markdown = (tmp_path / "report" / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| model") and "comparison" in line)
    row = _row(markdown, "tiny", "arith", "arith", "krpo - grpo")
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], row, strict=True))
    assert cells["paper difference (points), published"] == "5.00"  # checked against the paper: no mark
    seeds = cells["seeds for the published difference"]
    assert seeds == "> 100" or int(seeds) > 3
    assert "arXiv 0000.00000 (version: v1; table: Table 9; checked against the paper)" in markdown


def test_published_number_without_its_version_table_and_check_is_refused(tmp_path):
    """A number that does not say where it was taken from and how it was checked would pass for the paper's."""
    published = tmp_path / "published.yaml"
    published.write_text("- paper: X\n  source: arXiv 0000.00000\n  version: v1\n  table: Table 9\n  model: tiny\n"
                         "  accuracy:\n    - {benchmark: arith, algorithm: grpo, avg_at_k: 5.0}\n")
    with pytest.raises(ValueError, match="needs version, table, checked"):
        published_numbers(published)
    published.write_text(published.read_text().replace("  model:", "  checked: probably\n  model:"))
    with pytest.raises(ValueError, match="checked: paper or secondary"):
        published_numbers(published)


def test_pairing_cancels_problem_difficulty_that_an_unpaired_interval_would_carry():
    # Problems are either always solved or never: the algorithms agree everywhere but on 10 of 200 problems.
    easy = np.arange(200) < 100
    base = pd.DataFrame({"model": "m", "task": "t", "benchmark": "b", "seed": 0, "step": 1,
                         "problem_id": np.arange(200), "correct": easy})
    better = base.assign(correct=easy | (np.arange(200) >= 190))
    row = paired_differences(pd.concat([base.assign(algorithm="grpo"), better.assign(algorithm="krpo")]),
                             samples=500, confidence=0.95).iloc[0]
    assert row["difference"] == pytest.approx(0.05) and row["low"] > 0.02


def test_warm_start_is_the_common_baseline_of_every_seed():
    details = pd.concat([_details("sft", -1, 0.2, problems=200)] + [_details("grpo", s, 0.5, problems=200)
                                                                       for s in (0, 1, 2)])
    table = paired_differences(details, samples=200, confidence=0.95)
    row = table[table["comparison"] == "grpo - sft"].iloc[0]
    assert row["seeds"] == 3 and row["low"] > 0.15


def test_summary_paths_of_the_workflow_layout_name_their_run():
    assert summary_ident("results/eval/tiny/arith/krpo/seed2/math500.summary.parquet") == {
        "model": "tiny", "task": "arith", "algorithm": "krpo", "seed": 2, "benchmark": "math500"}
    assert summary_ident("results/eval/tiny/arith/sft/gsm8k.summary.parquet")["algorithm"] == "sft"
    assert summary_ident("elsewhere/x.parquet") is None


def test_tables_use_the_last_evaluated_step_of_each_run():
    frame = pd.concat([_details("grpo", 0, 0.5, step=s) for s in (10, 20)] + [_details("grpo", 1, 0.5, step=10)])
    kept = final_steps(frame)
    assert set(zip(kept["seed"], kept["step"], strict=True)) == {(0, 20), (1, 10)}


def _write_run(root, algorithm, seed, accuracy, *, model="tiny", task="arith", benchmark="arith", steps=(10,)):
    run = root / "eval" / model / task / ("sft" if algorithm == "sft" else f"{algorithm}/seed{seed}")
    frames = [_details(algorithm, seed, accuracy, model=model, task=task, benchmark=benchmark, step=0 if
                       algorithm == "sft" else step) for step in steps]
    details = pd.concat(frames).assign(seed=pd.array([None if algorithm == "sft" else seed] * sum(map(len, frames)),
                                                     dtype="Int64"))
    write_parquet(details, run / f"{benchmark}.details.parquet")
    summary = details.groupby(["model", "task", "benchmark", "algorithm", "step"]).agg(
        avg_at_k=("correct", "mean")).reset_index().assign(
        seed=pd.array([details["seed"].iloc[0]] * len(steps), dtype="Int64"), pass_at_1=0.1, pass_at_16=0.2,
        git_commit="abc", version_torch="2.13.0", settings_hash="h", command="kalmanrl evaluate ...")
    write_parquet(summary, run / f"{benchmark}.summary.parquet")
    metrics = None
    if algorithm != "sft":
        metrics = root / "runs" / model / task / algorithm / f"seed{seed}" / "metrics.parquet"
        write_parquet(pd.DataFrame({"model": model, "task": task, "algorithm": algorithm, "seed": seed,
                                    "step": [1, 2, 3], "reward_mean": [0.1, 0.2, accuracy], "kl": [0, 0.01, 0.02],
                                    "sign_switch_rate_raw": [0.5, 0.45, 0.4], "sign_switch_rate_filtered": [0.1] * 3,
                                    "sign_run_length_raw": [2.0, 2.2, 2.5], "sign_run_length_filtered": [9.0] * 3}),
                      metrics)
    return run / f"{benchmark}.summary.parquet", metrics


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """A grid with the warm start, GRPO and KRPO on two seeds (GRPO with an intermediate checkpoint), one KPO seed
    still running, and a paper setting (qwen3-4b on dapo_filter, aime24: paper-kpo's keys) that has published
    numbers."""
    root = tmp_path_factory.mktemp("results")
    runs = [_write_run(root, "sft", -1, 0.2), _write_run(root, "grpo", 0, 0.3, steps=(5, 10)),
            _write_run(root, "grpo", 1, 0.35, steps=(5, 10)), _write_run(root, "krpo", 0, 0.5),
            _write_run(root, "krpo", 1, 0.45),
            _write_run(root, "grpo", 0, 0.3, model="qwen3-4b", task="dapo_filter", benchmark="aime24")]
    summaries = [s for s, _ in runs] + [root / "eval/tiny/arith/kpo/seed0/arith.summary.parquet"]  # still running
    metrics = [m for _, m in runs if m] + [root / "runs/tiny/arith/kpo/seed0/metrics.parquet"]
    out = root / "report"
    build_report(summaries, metrics, out, settings=SETTINGS)
    return out


def test_summary_parquet_holds_every_finished_row_for_pandas_and_arrow(report_dir):
    summary = pd.read_parquet(report_dir / "summary.parquet")
    assert len(summary) == 1 + 2 * 2 + 2 + 1  # GRPO's intermediate step is a row too
    assert summary.loc[summary["algorithm"] == "sft", "seed"].isna().all()
    assert pq.read_table(report_dir / "summary.parquet").num_rows == len(summary)


def test_the_accuracy_and_comparison_tables_are_data_too(report_dir):
    """accuracy.parquet: every metric with its interval (pass@16 has none: the grid drew 2 samples per problem);
    comparisons.parquet: each comparison with its Holm p-value and the alpha it was judged at."""
    accuracy = pd.read_parquet(report_dir / "accuracy.parquet").set_index(["model", "algorithm"])
    grpo = accuracy.loc[("tiny", "grpo")]
    assert grpo["avg_at_k_low"] <= grpo["avg_at_k"] <= grpo["avg_at_k_high"]
    assert grpo["pass_at_1_low"] <= grpo["pass_at_1_high"] and pd.isna(grpo["pass_at_16_low"])
    differences = pd.read_parquet(report_dir / "comparisons.parquet")
    assert {"difference", "low", "high", "p_holm"} <= set(differences.columns) and (differences["alpha"] == 0.05).all()


def _row(markdown: str, *first_cells: str) -> list[str]:
    """The first Markdown table row whose leading cells are `first_cells`, as a list of stripped cells."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]
    return next(r for r in rows if r[:len(first_cells)] == list(first_cells))


def test_report_marks_missing_cells_and_lists_missing_inputs(report_dir):
    markdown = (report_dir / "report.md").read_text()
    assert "Partial results**: 2 expected inputs are missing" in markdown
    assert "kpo/seed0/arith.summary.parquet" in markdown
    kpo = _row(markdown, "tiny", "arith", "arith", "kpo")
    assert kpo[5] == "0/1" and kpo.count("missing") == 4  # step, avg@k, pass@1, pass@16


def test_report_has_intervals_differences_published_numbers_and_how_to_reproduce(report_dir):
    markdown = (report_dir / "report.md").read_text()
    assert _row(markdown, "tiny", "arith", "arith", "krpo - grpo") and _row(markdown, "tiny", "arith", "arith",
                                                                             "krpo - sft")
    paper = _row(markdown, "qwen3-4b", "dapo_filter", "aime24", "grpo")
    assert paper[-2:] == ["27.29 (secondary)", "53.33 (secondary)"]  # published avg@16 and pass@16 beside ours
    grpo = _row(markdown, "tiny", "arith", "arith", "grpo")
    assert grpo[4] == "10" and grpo[5] == "2/2" and grpo[-2:] == ["", ""]  # last step; no paper for this setting
    assert re.fullmatch(r"\d+\.\d \[\d+\.\d, \d+\.\d\]", grpo[6])
    differences_header = next(line for line in markdown.splitlines()
                              if line.startswith("| model") and "p (Holm)" in line)
    assert "paper difference" not in differences_header  # no published difference for this grid: no empty column
    assert "seeds to detect 5 points" in differences_header and "detects (points, 80% power)" in differences_header
    assert "NOT reproduced" in markdown and "snakemake --cores all --configfile config/config.yaml" in markdown
    assert "results/study/eval/<model>/<task>/<algorithm>/seed<seed>/<benchmark>.summary.parquet" in markdown


def test_the_reports_one_cell_command_gives_snakemake_the_cell_as_its_target():
    """--configfile takes every word after it as a config file: the cell written after it was read as a second config
    (a Parquet file, which Snakemake failed to decode), so the printed command did not run."""
    from snakemake.cli import get_argument_parser

    commands, _ = reproduce_text({"configfiles": ["config/config.yaml", "config/families.yaml"],
                                  "config": {"results_dir": "results/study"}})
    one_cell = [line for line in commands.splitlines() if line.startswith("snakemake") and "<benchmark>" in line]
    args = get_argument_parser().parse_args(one_cell[0].split()[1:])
    cell = "results/study/eval/<model>/<task>/<algorithm>/seed<seed>/<benchmark>.summary.parquet"
    assert list(args.targets) == [cell]
    assert [str(path) for path in args.configfile] == ["config/config.yaml", "config/families.yaml"]


def test_report_over_paper_kpo_keys_fills_the_kpo_papers_columns_marked_as_secondary(tmp_path):
    """Runs keyed as config/paper-kpo.yaml names them get the KPO paper's numbers beside them, KPO-clipped (`kpo`)
    and the unclipped KPO alike, each marked as checked only against a secondary source, that status beside the
    source."""
    runs = [_write_run(tmp_path, algorithm, 0, 0.4, model="qwen3-4b", task="dapo_filter", benchmark=benchmark)
            for algorithm, benchmark in (("kpo", "aime24"), ("kpo", "minerva_math"), ("kpo_unclipped", "minerva_math"))]
    build_report([s for s, _ in runs], list(dict.fromkeys(m for _, m in runs)), tmp_path / "report", settings=SETTINGS)
    markdown = (tmp_path / "report" / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| model") and "avg@k (%) [" in line)
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = [dict(zip(columns, _row(markdown, "qwen3-4b", "dapo_filter", benchmark, algorithm), strict=True))
            for benchmark, algorithm in (("aime24", "kpo"), ("minerva_math", "kpo"), ("minerva_math", "kpo_unclipped"))]
    published = [(row["paper avg@k (%), published"], row["paper pass@16 (%), published"]) for row in rows]
    assert published == [("37.91 (secondary)", "63.33 (secondary)"), ("38.23 (secondary)", ""),
                         ("39.15 (secondary)", "")]
    assert "`kpo` is the paper's KPO-clipped" in markdown
    assert "table: Table 1 as secondary sources cite it / not recorded; NOT checked against the paper" in markdown


def test_report_writes_one_figure_per_kind_and_model_task(report_dir):
    for kind in ("differences", "accuracy_vs_step", "curves", "token_noise"):
        assert (report_dir / "figures" / kind / "tiny__arith.png").stat().st_size > 5000
    assert (report_dir / "figures" / "accuracy_vs_step" / "qwen3-4b__dapo_filter.png").exists()


def test_html_report_renders_in_headless_chromium_with_tables_and_figures(report_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    page = f"file://{report_dir / 'report.html'}"
    dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    figures = list((report_dir / "figures").rglob("*.png"))
    assert dom.count("<table") == 4 and dom.count("src=\"data:image/png;base64,") == len(figures) == 7
    assert "Differences to GRPO" in dom and "How to reproduce this" in dom
    screenshot = tmp_path / "page.png"
    subprocess.run([chromium, *flags, f"--screenshot={screenshot}", "--window-size=1280,2000", page],
                   capture_output=True, timeout=120)
    pixels = pytest.importorskip("matplotlib.image").imread(screenshot)
    assert pixels.shape[:2] == (2000, 1280) and pixels[..., :3].std() > 0.05  # drawn, not a blank page


def test_report_over_nothing_finished_marks_every_cell_missing(tmp_path):
    summaries = [tmp_path / f"eval/tiny/arith/{run}/arith.summary.parquet" for run in ("sft", "grpo/seed0")]
    build_report(summaries, [tmp_path / "runs/tiny/arith/grpo/seed0/metrics.parquet"], tmp_path / "report",
                 settings=SETTINGS)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "3 expected inputs are missing" in markdown
    assert _row(markdown, "tiny", "arith", "arith", "grpo")[4:7] == ["missing", "0/1", "missing"]
    assert "paper avg@k" not in markdown.split("## Published numbers")[0]  # no published value: no column
    assert (tmp_path / "report" / "report.html").exists() and (tmp_path / "report" / "summary.parquet").exists()


def test_one_seed_comparisons_say_their_run_variance_is_unknown(tmp_path):
    runs = [_write_run(tmp_path, "grpo", 0, 0.3), _write_run(tmp_path, "krpo", 0, 0.5)]
    build_report([s for s, _ in runs], [m for _, m in runs], tmp_path / "report", settings=SETTINGS)
    markdown = (tmp_path / "report" / "report.md").read_text()
    row = _row(markdown, "tiny", "arith", "arith", "krpo - grpo")
    assert row[4] == "1" and row.count("unknown (1 seed)") == 2  # observed difference, 5 points
    assert "Comparisons with one seed hold the run fixed" in markdown


def test_token_noise_figure_needs_both_raw_and_filtered_columns(tmp_path):
    metrics = pd.DataFrame({"model": "m", "task": "t", "algorithm": "grpo", "seed": 0, "step": [1, 2],
                            "sign_switch_rate_raw": [0.5, 0.4]})
    assert plot_token_noise(metrics, tmp_path) == []
    written = plot_token_noise(metrics.assign(sign_switch_rate_filtered=[0.1, 0.1]), tmp_path)
    assert [p.name for p in written] == ["m__t.png"]


def test_provenance_table_tells_environments_apart_by_commit_lock_and_machine():
    rows = pd.DataFrame({"git_commit": ["abc"] * 4, "version_torch": ["2.13.0"] * 4,
                         "lock": ["cpu.txt"] * 4, "lock_matches": [True, True, True, False],
                         "lock_mismatches": ["", "", "", "numpy==2.4.5 (lock 2.3.1)"],
                         "cpu_model": ["AMD EPYC", "AMD EPYC", "Intel Xeon", "AMD EPYC"],
                         "cpu_isa": ["avx2", "avx2", "avx2 avx512f", "avx2"], "settings_hash": ["a", "b", "c", "d"],
                         "sha256_policy": ["1", "2", "3", "4"]})
    table = provenance_table(rows)
    assert {"lock", "lock_matches", "cpu_model", "cpu_isa", "git_commit", "version_torch"} <= set(table.columns)
    assert not {"settings_hash", "sha256_policy"} & set(table.columns)  # per cell by design, not an environment
    assert sorted(table["rows"]) == [1, 1, 2]


def test_left_out_table_counts_dropped_prompts_and_limit_hits_per_run_and_evaluation():
    curves = pd.DataFrame({"model": "tiny", "task": "arith", "algorithm": "grpo", "seed": 0, "step": [1, 2],
                           "overlong_prompts_dropped": [31, 31], "limit_hits": [1, 2]})
    summary = pd.DataFrame({"model": "tiny", "task": "arith", "algorithm": ["sft", "grpo"], "seed": [-1, 0],
                            "benchmark": "math500", "overlong_prompts_dropped": [2, 2], "limit_hits": [0, 3]})
    table = left_out_table(summary, curves)
    assert list(table.columns) == ["stage", "model", "task", "algorithm", "seed", "benchmark",
                                   "overlong_prompts_dropped", "limit_hits"]
    assert table[["stage", "algorithm", "benchmark", "overlong_prompts_dropped", "limit_hits"]].values.tolist() == [
        ["train", "grpo", "", 31, 3], ["evaluate", "sft", "math500", 2, 0], ["evaluate", "grpo", "math500", 2, 3]]
    assert table["seed"].tolist() == [0, "-", 0]  # the warm start has no seed (it printed NO_SEED, -1)
    assert left_out_table(summary.drop(columns=["overlong_prompts_dropped"]), pd.DataFrame()) is None


def test_pass_at_k_with_k_equal_to_the_samples_gets_its_per_problem_matrix():
    """pass@2 from 2 samples per problem is 1 where either sample is right (every pair drawn is the whole set), so it
    has a seeds x problems matrix and an interval like any metric; pass@3 from 2 samples has none."""
    details = pd.DataFrame({"seed": [0] * 4 + [1] * 4, "problem_id": ["a", "a", "b", "b"] * 2,
                            "correct": [True, False, False, False, False, False, True, True]})
    matrices = problem_matrices(details, ["pass_at_1", "pass_at_2", "pass_at_3"])
    assert set(matrices) == {"pass_at_1", "pass_at_2"}
    assert matrices["pass_at_2"].to_numpy().tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert matrices["pass_at_1"].to_numpy().tolist() == [[0.5, 0.0], [0.0, 1.0]]
