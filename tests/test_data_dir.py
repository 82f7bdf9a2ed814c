"""Where datasets come from: the copy directory named by `data.local_dir` or $KALMANRL_DATA_DIR, else the hub; a
named directory or file that is missing fails naming the setting (never a silent fall-back to the hub)."""

from __future__ import annotations

import pytest

from kalmanrl.configuration.config import validate_config
from kalmanrl.data.dataset import DataError
from kalmanrl.data.loaders import build_dataset
from kalmanrl.data.sources import DATA_DIR_ENV, resolve_local_dir

PRESETS = {"easy": [3, 3]}


def test_nothing_outside_the_repository_by_default():
    assert validate_config({})["data"]["local_dir"] is None


def test_no_setting_and_no_environment_means_the_hub():
    assert resolve_local_dir(None, environ={}) is None


def test_the_config_setting_wins_over_the_environment(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_local_dir(str(tmp_path), environ={DATA_DIR_ENV: str(other)}) == tmp_path


def test_the_environment_names_the_directory_when_the_config_does_not(tmp_path):
    assert resolve_local_dir(None, environ={DATA_DIR_ENV: str(tmp_path)}) == tmp_path


@pytest.mark.parametrize("setting, environ, named", [
    ("no/such/dir", {}, "data.local_dir = 'no/such/dir'"),
    (None, {DATA_DIR_ENV: "no/such/dir"}, f"${DATA_DIR_ENV} = 'no/such/dir'"),
])
def test_a_missing_directory_is_an_error_naming_the_setting(setting, environ, named):
    with pytest.raises(DataError, match="^" + named.replace("$", r"\$") + ": no such directory"):
        resolve_local_dir(setting, environ=environ)


def test_a_missing_file_names_both_settings(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}/math500/test.jsonl: file not found .*data.local_dir or "
                                        rf"\${DATA_DIR_ENV}"):
        build_dataset({"loader": "math500"}, local_dir=tmp_path, seed=0, arithmetic_presets=PRESETS)


def test_a_local_only_loader_without_a_copy_directory_says_how_to_name_one():
    with pytest.raises(DataError, match=rf"tasks.jsonl: a local copy is needed .*data.local_dir or \${DATA_DIR_ENV}"):
        build_dataset({"loader": "arithmetic_file", "params": {"file": "tasks.jsonl"}}, local_dir=None, seed=0,
                      arithmetic_presets=PRESETS)


def test_the_generator_needs_no_copies():
    table, _ = build_dataset({"loader": "arithmetic", "params": {"difficulty": "easy", "train_size": 4,
                                                                "test_size": 2}},
                             local_dir=None, seed=0, arithmetic_presets=PRESETS)
    assert table.num_rows == 6
