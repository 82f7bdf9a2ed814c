"""Each stage's params carry only the settings it reads, so a config change reruns exactly the jobs it affects:
toggling `data.decontaminate` reruns the decontaminate jobs (and, through their outputs, what depends on them), never
the dataset builds."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from kalmanrl.configuration.config import stage_settings, validate_config
from smoke_runs import smoke_config, smoke_workdir, snakemake

TARGET = "results/data/arithmetic_laptop.train.parquet"


def test_data_settings_do_not_carry_decontaminate(repo_root):
    config = yaml.safe_load((repo_root / "config" / "config.yaml").read_text())
    toggled = copy.deepcopy(config)
    toggled.setdefault("data", {})["decontaminate"] = False
    on, off = (validate_config(c) for c in (config, toggled))
    assert on["data"]["decontaminate"] and not off["data"]["decontaminate"]
    assert stage_settings(on, "data", dataset="arithmetic_laptop") == stage_settings(off, "data",
                                                                                    dataset="arithmetic_laptop")
    assert "decontaminate" not in stage_settings(on, "data", dataset="arithmetic_laptop")["data"]


@pytest.mark.slow
def test_toggling_decontaminate_reruns_only_the_decontaminate_job(repo_root, tmp_path):
    config = yaml.safe_load((repo_root / "config" / "config.yaml").read_text())
    (tmp_path / "copies").mkdir()  # the arithmetic task is generated: no dataset copy is read
    config["data"] = {**config.get("data", {}), "local_dir": str(tmp_path / "copies")}
    toggled = copy.deepcopy(config)
    toggled["data"]["decontaminate"] = False
    for name, value in (("on.yaml", config), ("off.yaml", toggled)):
        (tmp_path / name).write_text(yaml.safe_dump(value))
    snakemake(tmp_path, "--configfile", str(tmp_path / "on.yaml"), "--cores", "1", TARGET)
    dataset = tmp_path / "results" / "data" / "arithmetic_laptop.parquet"
    built = dataset.stat().st_mtime_ns

    # A dry run, not `--list-changes params`: Snakemake 9.27 lists every output there even for an unchanged config.
    assert "rule" not in snakemake(tmp_path, "--configfile", str(tmp_path / "on.yaml"), "-n",
                                    TARGET).stdout  # up to date
    dry = snakemake(tmp_path, "--configfile", str(tmp_path / "off.yaml"), "-n", TARGET)
    assert "rule decontaminate:" in dry.stdout and "rule data:" not in dry.stdout
    assert "Params have changed" in dry.stdout
    snakemake(tmp_path, "--configfile", str(tmp_path / "off.yaml"), "--cores", "1", TARGET)
    assert dataset.stat().st_mtime_ns == built


# A stand-in `kalmanrl` that creates what each stage's command names as its outputs and computes nothing: the workflow's
# rerun decisions (params, inputs, mtimes) in seconds, without a model.
STUB = """#!/usr/bin/env python3
import sys
from pathlib import Path

stage, args = sys.argv[1], sys.argv[2:]
out = Path(args[args.index("--out") + 1])
if stage in ("data", "decontaminate"):
    out.write_text(stage)
elif stage in ("model", "sft"):
    out.mkdir(parents=True)
elif stage == "train":
    (out / "final").mkdir(parents=True)
    (out / "metrics.parquet").write_text(stage)
else:
    sys.exit(f"stand-in kalmanrl: no {stage} stage")
"""
RUN = "results/runs/tiny/arithmetic_easy/krpo/seed0/metrics.parquet"


def planned(workdir: Path, env: dict, **overrides: dict) -> str:
    """A dry run of RUN with the smoke config's sections updated by `overrides`."""
    changed = workdir / "changed.yaml"
    changed.write_text(yaml.safe_dump(smoke_config(["krpo"], **overrides)))
    result = snakemake(workdir, "-n", RUN, f"--configfile={changed}", env=env)
    return result.stdout + result.stderr


def test_the_ranks_of_a_training_job_do_not_rerun_it(tmp_path):
    """resources.train.gpus and cpu_ranks spread a run over devices; they do not change what it computes (N ranks
    train like one, and a checkpoint resumes on any number of ranks). Raising them, as `kalmanrl plan` advises for a
    job that does not fit, must not rerun the finished runs and every evaluation after them; a training setting
    does rerun them."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "kalmanrl").write_text(STUB)
    (tmp_path / "bin" / "kalmanrl").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    workdir = smoke_workdir(tmp_path / "work", ["krpo"])
    snakemake(workdir, "--cores", "1", RUN, env=env)

    for train in ({"cpu_ranks": 2}, {"gpus": 2}, {"gpus": 2, "nodes": 2}):
        assert "Nothing to be done" in planned(workdir, env, resources={"train": train}), train
    assert "rule train:" in planned(workdir, env, train={"lr": 1.0e-3})
