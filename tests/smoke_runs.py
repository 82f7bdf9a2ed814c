"""The workflow as the workflow tests run it: `snakemake` on a working directory whose config/config.yaml is
config/smoke.yaml (results under `results/`, the benchmark data shipped in tests/data), and the Parquet results of a
finished run read for comparison. conftest.py runs the full smoke workflow once per session (`smoke_run`); the
SLURM tests run part of it and compare that part with the local run (`assert_part_of_the_smoke_run`)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
# Columns that measure time or speed, or name the machine, not results: they differ between any two runs.
TIMING = re.compile(r"time|seconds|duration|per_s|elapsed|timestamp|hostname|created")


def snakemake(workdir: Path, *args: str, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """This repository's Snakefile run on WORKDIR; with `check`, a failure shows the ends of its logs."""
    result = subprocess.run(["snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args],
                            capture_output=True, text=True, **popen)
    if check:
        assert result.returncode == 0, \
            f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def smoke_config(algorithms: list[str] | None = None, **overrides: dict) -> dict:
    """config/smoke.yaml for a working directory: only the named algorithms when given, and each override merged
    into its section."""
    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    config.update(results_dir="results", data={**config["data"], "local_dir": str(REPO / config["data"]["local_dir"])})
    if algorithms is not None:
        config["algorithms"] = {name: config["algorithms"][name] for name in algorithms}
    for section, values in overrides.items():
        config[section] = {**config.get(section, {}), **values}
    return config


def smoke_workdir(root: Path, algorithms: list[str] | None = None, **overrides: dict) -> Path:
    """ROOT with config/config.yaml written from `smoke_config(algorithms, **overrides)`."""
    (root / "config").mkdir(parents=True)
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(smoke_config(algorithms, **overrides)))
    return root


def parquet_results(results: Path) -> dict[str, pd.DataFrame]:
    """Every Parquet result (not checkpoints) by path relative to RESULTS, without the columns of TIMING."""
    frames = {}
    for path in sorted(results.rglob("*.parquet")):
        if "checkpoints" in path.parts:
            continue
        frame = pd.read_parquet(path)
        frames[str(path.relative_to(results))] = frame.drop(columns=[c for c in frame.columns if TIMING.search(c)])
    return frames


def assert_part_of_the_smoke_run(results: Path, smoke_results: Path, algorithms: list[str]) -> None:
    """RESULTS, of the smoke workflow restricted to ALGORITHMS, equal the full smoke run's results for those
    algorithms: the same files, each equal to the last bit (timing columns aside); the report's summary and accuracy
    table have the full run's rows of these algorithms and of the warm start. The report's comparisons are left out:
    their Holm p-values and power depend on how many comparisons the report makes, so a part's are its own."""
    dropped = set(smoke_config()["algorithms"]) - set(algorithms)
    assert dropped, "not a part: every algorithm of the smoke config"
    comparisons = "report/comparisons.parquet"
    expected = {name: frame for name, frame in parquet_results(smoke_results).items()
                if not dropped & set(Path(name).parts) and name != comparisons}
    got = parquet_results(results)
    assert sorted(got) == sorted([*expected, comparisons])
    for table in ("report/summary.parquet", "report/accuracy.parquet"):
        rows = expected[table]["algorithm"].isin(["sft", *algorithms])
        expected[table] = expected[table][rows].reset_index(drop=True)
    for name, frame in expected.items():
        pd.testing.assert_frame_equal(got[name], frame, obj=name)
