"""`kalmanrl compare-summary`: a run's report summary against an expected one, exactly, naming each difference."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from kalmanrl.cli import main
from kalmanrl.expected import compare_summary, expected_rows, write_expected


def summary() -> pd.DataFrame:
    frame = pd.DataFrame({"model": ["tiny"] * 3, "task": ["a"] * 3, "algorithm": ["sft", "grpo", "kpo"],
                          "seed": pd.array([None, 0, 0], dtype="Int64"), "step": pd.array([0, 2, 2], dtype="Int64"),
                          "benchmark": ["b"] * 3, "avg_at_k": [0.1, 1 / 3, 0.25], "pass_at_2": [0.2, 0.5, 0.5],
                          "n_problems": [8, 8, 8], "sha256_model": ["x", "y", "z"],
                          "version_torch": ["2.13.0", "2.13.0", "2.14.0"], "cpu_model": ["A", "B", "C"]})
    return frame


def test_a_recorded_summary_compares_equal_and_ignores_provenance(tmp_path):
    summary().to_parquet(tmp_path / "s.parquet")
    expected = write_expected(tmp_path / "s.parquet", tmp_path / "e.json")
    assert expected["columns"] == ["avg_at_k", "pass_at_2", "n_problems", "sha256_model"]
    other = summary().assign(version_torch="9", cpu_model="elsewhere")
    other.to_parquet(tmp_path / "other.parquet")
    assert compare_summary(tmp_path / "other.parquet", tmp_path / "e.json") == []
    rows = {row["algorithm"]: row for row in json.loads((tmp_path / "e.json").read_text())["rows"]}
    assert rows["grpo"]["avg_at_k"] == 1 / 3 and rows["sft"]["seed"] is None  # exact round trip


def test_every_difference_is_named_down_to_the_last_bit(tmp_path):
    write_expected_from = tmp_path / "s.parquet"
    summary().to_parquet(write_expected_from)
    write_expected(write_expected_from, tmp_path / "e.json")
    changed = summary()
    changed.loc[1, "avg_at_k"] = math.nextafter(1 / 3, 1)  # one ulp off
    changed = changed.drop(index=2)
    changed.to_parquet(tmp_path / "run.parquet")
    differences = compare_summary(tmp_path / "run.parquet", tmp_path / "e.json")
    assert len(differences) == 2
    assert differences[0].startswith("missing row {'model': 'tiny', 'task': 'a', 'algorithm': 'kpo'")
    assert "'algorithm': 'grpo'" in differences[1] and "avg_at_k = 0.33333333333333337, expected 0.3333333333333333" \
        in differences[1]


def test_the_command_exits_1_on_a_difference_and_0_on_a_match(tmp_path, capsys):
    summary().to_parquet(tmp_path / "s.parquet")
    assert main(["compare-summary", str(tmp_path / "s.parquet"), str(tmp_path / "e.json"), "--write"]) == 0
    assert main(["compare-summary", str(tmp_path / "s.parquet"), str(tmp_path / "e.json")]) == 0
    summary().assign(n_problems=9).to_parquet(tmp_path / "s.parquet")
    assert main(["compare-summary", str(tmp_path / "s.parquet"), str(tmp_path / "e.json")]) == 1
    assert "3 difference(s)" in capsys.readouterr().out


def test_a_table_that_is_not_a_summary_is_refused():
    with pytest.raises(ValueError, match="not a report summary"):
        expected_rows(pd.DataFrame({"x": [1]}))


@pytest.mark.parametrize("name", ["config", "smoke"])
def test_each_recorded_expectation_covers_its_configs_whole_grid(repo_root, name):
    """config/<name>.expected.json holds one row per evaluation its config asks for: the warm start, and every
    algorithm and seed at each kept step and the last, on every benchmark (a row missing from the file could never
    be checked)."""
    import yaml

    from kalmanrl.config import validate_config

    config = validate_config(yaml.safe_load((repo_root / "config" / f"{name}.yaml").read_text()))
    train = config["train"]
    steps = sorted({*range(train["keep_every"], train["steps"], train["keep_every"] or train["steps"]),
                    train["steps"]})
    cells = {(model, task, "sft", None, 0, benchmark) for model in config["models"] for task in config["tasks"]
             for benchmark in config["benchmarks"]}
    cells |= {(model, task, algorithm, seed, step, benchmark) for model in config["models"]
              for task in config["tasks"] for algorithm in config["algorithms"] for seed in config["seeds"]
              for step in steps for benchmark in config["benchmarks"]}
    recorded = json.loads((repo_root / "config" / f"{name}.expected.json").read_text())
    assert {tuple(row[k] for k in recorded["key"]) for row in recorded["rows"]} == cells
