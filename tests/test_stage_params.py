"""Each stage's params carry only the settings it reads, so a config change reruns exactly the jobs it affects:
toggling `data.decontaminate` reruns the decontaminate jobs (and, through their outputs, what depends on them), never
the dataset builds."""

from __future__ import annotations

import copy

import pytest
import yaml

from kalmanrl.configuration.config import stage_settings, validate_config
from smoke_runs import snakemake

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
