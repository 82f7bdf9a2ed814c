"""`kalmanrl <stage> --help` documents every setting from the schema; bad settings fail with the key named."""

import json
import re
import subprocess
import sys

import pytest

from job_settings import job_inputs, job_settings
from kalmanrl.cli import build_parser, main
from kalmanrl.configuration.config import load_schema, validate_config


def run(*args):
    return subprocess.run([sys.executable, "-m", "kalmanrl.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("stage,part", [("train", "train"), ("train", "algorithm"), ("evaluate", "evaluate"),
                                        ("evaluate", "model"), ("sft", "sft"), ("data", "data")])
def test_stage_help_lists_every_key_of_its_settings(stage, part):
    result = run(stage, "--help")
    assert result.returncode == 0
    for key in load_schema()["$defs"][part]["properties"]:
        assert f"  {key} (default" in result.stdout, key


def test_config_reference_and_validation(repo_root):
    assert "checkpoint_every" in run("config").stdout
    result = run("config", str(repo_root / "config" / "smoke.yaml"))
    assert result.returncode == 0 and '"group_size": 4' in result.stdout


def test_config_reference_lists_every_top_level_key_too():
    """`kalmanrl config` prints every key (README, "Configure"): the top-level ones were missing."""
    reference = run("config").stdout
    for key in load_schema()["properties"]:
        assert any(f"{lead}{key}{tail}" in reference for lead in ("  ", "\n") for tail in (" (default", ":")), key
    assert '  results_dir (default "results")' in reference and "  seeds (default [0, 1, 2])" in reference


def test_config_reference_calls_required_only_the_keys_the_schema_requires():
    """A key without a default was printed "(default required)", so the optional `lora` (absent = off) read as one to
    set; only a section's `required` keys are required (a dataset's loader)."""
    reference = run("config").stdout
    assert "  lora (default unset)" in reference and "  id (default unset)" in reference
    assert "  loader (default required)" in reference and reference.count("(default required)") == 1


def test_settings_help_says_what_its_config_option_takes():
    """`--config` is a config file here but KEY=VALUE overrides in `kalmanrl plan`; its help said neither."""
    assert "a config file; repeat it to merge several in order, as Snakemake's --configfile does (default " \
        "config/config.yaml)" in " ".join(run("settings", "--help").stdout.split())


def test_bad_settings_exit_2_naming_the_key(tmp_path, capsys):
    code = main(["train", "--settings", job_settings("train", train={"lr": -1}), *job_inputs(tmp_path),
                 "--out", str(tmp_path)])
    assert code == 2
    assert "train.lr" in capsys.readouterr().err


def test_an_unknown_part_of_the_settings_exits_2_naming_it(tmp_path, capsys):
    settings = tmp_path / "settings.yaml"
    settings.write_text("sfft: {steps: 1}\n")
    code = main(["sft", "--settings", f"@{settings}", *job_inputs(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2
    assert f"{settings}: unknown part 'sfft' of the sft stage's settings (known parts: sft, template, " in \
        capsys.readouterr().err


def test_a_tiny_models_settings_without_its_templates_exit_2_naming_them(tmp_path, capsys):
    """The templates are optional (only a tiny model's tokenizer is trained on them): their absence was a KeyError."""
    settings = json.dumps({"model": validate_config({})["models"]["tiny"]})
    assert main(["model", "--settings", settings, "--out", str(tmp_path / "m")]) == 2
    assert "--settings: a tiny model's settings need 'templates'" in capsys.readouterr().err


@pytest.mark.parametrize("settings, message", [
    ({"benchmark": {"loader": "math500", "reward": "exact"}}, "benchmark.reward: unknown reward 'exact' (known: "),
    ({"benchmark": {"loader": "arithmetic", "template": "r1"}},
     "benchmark.template: unknown prompt template 'r1' (known: "),
    ({"plugins": ["missing_plugin.py"]}, "plugins[0]: no file 'missing_plugin.py'"),
])
def test_a_jobs_settings_are_checked_against_the_registries_before_it_runs(tmp_path, capsys, settings, message):
    code = main(["evaluate", "--settings", job_settings("evaluate", **settings), *job_inputs(tmp_path),
                 "--details", str(tmp_path / "d"), "--summary", str(tmp_path / "s")])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("config_first", [False, True])
def test_settings_command_prints_a_jobs_settings(repo_root, config_first):
    config = ["--configfile", str(repo_root / "config" / "smoke.yaml")]
    select = ["model=tiny", "task=arithmetic_easy", "algorithm=kpo", "seed=0"]
    result = run("settings", "train", *(config + select if config_first else select + config))
    assert result.returncode == 0, result.stderr
    assert '"ratio": "kpo"' in result.stdout


def test_settings_resolved_prints_the_warm_starts_precision_on_each_device():
    precisions = {}
    for device in ("cpu", "cuda"):
        result = run("settings", "sft", "model=tiny", "task=arithmetic_laptop", "--resolved", device)
        assert result.returncode == 0, result.stderr
        precisions[device] = json.loads(result.stdout)["sft"]["precision"]
    assert precisions == {"cpu": "float32", "cuda": "autocast_bf16"}  # sft.precision: auto
    result = run("settings", "model", "model=tiny", "--resolved", "cpu")
    assert result.returncode == 2 and "not a model job's" in result.stderr


def test_settings_command_merges_config_files_as_snakemake_does(repo_root):
    """The families study runs `--configfile config/config.yaml config/families.yaml`: its DAPO jobs exist only in the
    merge, so a command reading one file could not print their settings."""
    configs = [item for name in ("config.yaml", "families.yaml")
               for item in ("--configfile", str(repo_root / "config" / name))]
    result = run("settings", "train", *configs, "model=tiny", "task=arithmetic_laptop", "algorithm=dapo", "seed=0")
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)
    assert settings["algorithm"]["aggregate"] == "dapo" and settings["train"]["steps"] == 80  # the overlay, the base
    alone = run("settings", "train", "--configfile", str(repo_root / "config" / "config.yaml"), "model=tiny",
                "task=arithmetic_laptop", "algorithm=dapo", "seed=0")
    assert alone.returncode == 2 and "algorithm=dapo: not in the config's algorithms" in alone.stderr


@pytest.mark.parametrize("stage, select, message", [
    ("train", ["model=tiny"], "the train job needs task=..., algorithm=..., seed=..."),
    ("train", ["model=nope", "task=arithmetic_easy", "algorithm=kpo", "seed=0"],
     "model=nope: not in the config's models"),
    ("train", ["model=tiny", "task=arithmetic_easy", "algorithm=kpo", "sed=0"], "'sed=0': train jobs are selected by"),
    ("train", ["model", "tiny"], "'model': train jobs are selected by"),
    ("train", ["model=tiny", "task=arithmetic_easy", "algorithm=kpo", "seed=x"], "seed=x: not a number"),
    ("evaluate", ["model=tiny", "task=arithmetic_easy", "algorithm=kpo", "benchmark=arithmetic_easy"],
     "the evaluate job needs seed=..."),
    # jobs the workflow does not run for this config: another task, a seed not among its seeds
    ("train", ["model=tiny", "task=arithmetic_laptop", "algorithm=kpo", "seed=0"],
     r"task=arithmetic_laptop: not in the config's tasks \(known: arithmetic_easy\)"),
    ("train", ["model=tiny", "task=arithmetic_easy", "algorithm=kpo", "seed=7"],
     r"seed=7: not in the config's seeds \(known: 0\)"),
])
def test_settings_selectors_that_name_no_job_exit_2_naming_the_selector(repo_root, capsys, stage, select, message):
    """They crashed with a traceback (KeyError, ValueError), or a misspelt seed printed settings with no seed."""
    assert main(["settings", stage, *select, "--configfile", str(repo_root / "config" / "smoke.yaml")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert main(["settings", "evaluate", "--configfile", str(repo_root / "config" / "smoke.yaml"), "model=tiny",
                 "task=arithmetic_easy", "algorithm=sft", "benchmark=arithmetic_easy"]) == 0


def test_unknown_arguments_are_still_refused():
    result = run("settings", "train", "--configfile", "config/smoke.yaml", "--bogus")
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr


def test_every_stage_is_a_subcommand():
    choices = build_parser()._subparsers._group_actions[0].choices
    assert {"data", "decontaminate", "model", "sft", "train", "evaluate", "report"} <= set(choices)


@pytest.mark.parametrize("argv, message", [
    (["train", "--threads", "0"], "argument --threads: invalid integer >= 1 value: '0'"),
    (["train", "--nodes", "0"], "argument --nodes: invalid integer >= 1 value: '0'"),
    (["train", "--cpu-ranks", "-2"], "argument --cpu-ranks: invalid integer >= 1 value: '-2'"),
    (["evaluate", "--gpus", "-1"], "argument --gpus: invalid integer >= 0 value: '-1'"),
])
def test_counts_of_threads_nodes_ranks_and_gpus_below_their_least_exit_2_naming_them(argv, message, capsys,
                                                                                     tmp_path):
    stage, *rest = argv
    outputs = {"train": ["--out", "o"], "evaluate": ["--details", "a", "--summary", "b"]}[stage]
    required = [*job_inputs(tmp_path), *outputs]
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([stage, "--settings", "{}", *required, *rest])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "{tmp}/missing", "--dataset", "{tmp}/data.parquet", "--out", "o"],
     "argument --model: no directory {tmp}/missing"),
    (["evaluate", "--model", "{tmp}/data.parquet", "--dataset", "{tmp}/data.parquet", "--details", "a",
      "--summary", "b"],
     "argument --model: no directory {tmp}/data.parquet (a file)"),
    (["sft", "--model", "{tmp}/model", "--dataset", "{tmp}/model", "--out", "o"],
     "argument --dataset: no file {tmp}/model (a directory)"),
    (["train", "--model", "{tmp}/model", "--dataset", "{tmp}/data.parquet", "--out", "o", "--validation-data",
      "{tmp}/data.parquet", "{tmp}/missing.parquet"], "argument --validation-data: no file {tmp}/missing.parquet"),
    (["report", "--summaries", "{tmp}/missing.parquet", "--out", "o"],
     "argument --summaries: no file {tmp}/missing.parquet"),
])
def test_an_input_path_that_does_not_exist_exits_2_naming_the_option(tmp_path, capsys, argv, message):
    """A mistyped input stopped a job only when it was first read (for a model directory, a hub lookup's traceback,
    under torchrun once per rank)."""
    job_inputs(tmp_path)  # {tmp}/model and {tmp}/data.parquet exist
    stage, *rest = argv
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([stage, "--settings", "{}", *(part.format(tmp=tmp_path) for part in rest)])
    assert exit_.value.code == 2 and message.format(tmp=tmp_path) in capsys.readouterr().err


def test_a_visible_devices_list_that_cannot_be_used_exits_2_naming_it(tmp_path, capsys, monkeypatch):
    """CUDA_VISIBLE_DEVICES naming one device twice fails before the job runs, as a message, not a traceback."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,0")
    monkeypatch.setattr("kalmanrl.runtime.devices.enumerate_gpus", lambda: None)  # as without nvidia-smi
    code = main(["evaluate", "--settings", job_settings("evaluate"), *job_inputs(tmp_path),
                 "--details", str(tmp_path / "d"), "--summary", str(tmp_path / "s"), "--gpus", "1"])
    assert code == 2
    assert "kalmanrl: CUDA_VISIBLE_DEVICES='0,0': entry '0' names a device an earlier entry" in capsys.readouterr().err
