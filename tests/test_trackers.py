"""Experiment trackers (train.loggers): a short training run sends every step's float metrics, the resolved settings
and the environment to TensorBoard, W&B (offline) and MLflow (its default store in the run directory), all read back
without a network; a resumed run logs on from its checkpoint in the same tracker runs; an unknown name is refused at
validation and a missing package names the key and the extra to install."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from job_settings import job_settings
from kalmanrl.configuration.config import ConfigError, parse_settings, validate_config
from kalmanrl.core.layout import trackers_dir
from kalmanrl.jobs import trainer
from kalmanrl.runtime.trackers import TRACKERS, Tracker, start_trackers
from test_trainer import settings_for

ALL = ["tensorboard", "wandb", "mlflow"]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline, its own files in tmp_path; every tracker at its default place in the run directory."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    for name in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


def float_metrics(metrics: pd.DataFrame) -> list[str]:
    return [column for column in metrics.columns if metrics[column].dtype.kind == "f"]


def tensorboard_scalars(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trackers_dir(run_dir) / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{trackers_dir(run_dir) / 'mlflow.db'}")
    return client, client.get_run((trackers_dir(run_dir) / "mlflow.id").read_text())


def wandb_records(run_file: Path) -> list:
    """The records of an offline run's .wandb file, read without wandb's service: a 7-byte header (":W&B", magic,
    version), then LevelDB's log format (32 KiB blocks of chunks, each with a 7-byte checksum/length/type header)."""
    from wandb.proto import wandb_internal_pb2

    data, block, records, chunk, position = run_file.read_bytes(), 1 << 15, [], b"", 7
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if block - position % block < 7 or kind == 0:  # a block's padding
            position += block - position % block
            continue
        chunk += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            records.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_runs(run_dir: Path) -> list[tuple[str, dict, list[dict]]]:
    """Each offline W&B run in the run directory, oldest first: (its id, its config, its history rows)."""
    runs = []
    for run_file in sorted((trackers_dir(run_dir) / "wandb").glob("offline-run-*/run-*.wandb")):
        records = wandb_records(run_file)
        config = {_key(item): json.loads(item.value_json) for record in records
                  if record.WhichOneof("record_type") == "config" for item in record.config.update}
        history = [{_key(item): json.loads(item.value_json) for item in record.history.item} for record in records
                   if record.WhichOneof("record_type") == "history"]
        runs.append((run_file.stem.removeprefix("run-"), config, history))
    return runs


@pytest.mark.slow
def test_every_tracker_gets_each_steps_metrics_the_settings_and_the_provenance(tmp_path, tiny_model_dir,
                                                                               arithmetic_parquet, offline):
    run_dir = tmp_path / "run"
    metrics = trainer.train(tiny_model_dir, arithmetic_parquet, run_dir,
                            settings=settings_for("grpo", steps=2, loggers=ALL))
    keys = float_metrics(metrics)
    assert {"loss", "reward_mean", "lr", "time_update"} <= set(keys)
    environment = json.loads((run_dir / "final" / "provenance.json").read_text())["environments"][-1]

    events = tensorboard_scalars(run_dir)
    for key in keys:
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [1, 2], key
        np.testing.assert_allclose([e.value for e in logged], metrics[key], rtol=1e-6, equal_nan=True, err_msg=key)
    text = {tag: events.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()
            for tag in ("settings", "provenance")}
    assert json.loads(text["settings"].strip("`\n"))["train"]["loggers"] == ALL
    assert json.loads(text["provenance"].strip("`\n"))["git_commit"] == environment["git_commit"]

    client, run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny/arith/grpo/seed0"
    for key in keys:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
        np.testing.assert_allclose([m.value for m in history], metrics[key], equal_nan=True, err_msg=key)
    assert run.data.params["train.lr"] == "0.001" and run.data.params["algorithm.advantage"] == "grpo"
    assert run.data.params["train.loggers"] == json.dumps(ALL)
    assert {f"provenance.{key}": str(value) for key, value in environment.items()}.items() <= run.data.tags.items()

    [(run_id, config, history)] = wandb_runs(run_dir)
    assert run_id == (trackers_dir(run_dir) / "wandb.id").read_text()
    assert config["settings"]["train"]["lr"] == 0.001 and config["provenance"] == environment
    assert [row["step"] for row in history] == [1, 2]
    for key in keys:
        np.testing.assert_allclose([row[key] for row in history], metrics[key], equal_nan=True, err_msg=key)


class Stopped(Exception):
    """The job was killed."""


@pytest.mark.slow
def test_a_resumed_run_logs_on_in_its_tracker_runs_and_a_fresh_start_gets_new_ones(tmp_path, tiny_model_dir,
                                                                                   arithmetic_parquet, offline,
                                                                                   monkeypatch):
    run_dir, settings = tmp_path / "run", settings_for("grpo", steps=3, loggers=ALL)
    started = []

    def keep(*args, **kwargs):
        started.append(start_trackers(*args, **kwargs))
        return started[-1]

    def killed_before_the_second_checkpoint(run, step, checkpoint=trainer.checkpoint):
        if step == 2:
            raise Stopped
        checkpoint(run, step)

    monkeypatch.setattr(trainer, "start_trackers", keep)
    with monkeypatch.context() as killing, pytest.raises(Stopped):
        killing.setattr(trainer, "checkpoint", killed_before_the_second_checkpoint)
        trainer.train(tiny_model_dir, arithmetic_parquet, run_dir, settings=settings)
    # The trainer closed its trackers as the loop ended: steps 1 and 2 are logged, only step 1 checkpointed.
    metrics = trainer.train(tiny_model_dir, arithmetic_parquet, run_dir, settings=settings)
    assert len(started) == 2 and list(metrics["step"]) == [1, 2, 3]

    # TensorBoard hides the interrupted start's step 2 (purge_step); MLflow and W&B keep both values of it.
    assert [e.step for e in tensorboard_scalars(run_dir).Scalars("loss")] == [1, 2, 3]
    client, run = mlflow_run(run_dir)
    assert len(client.search_runs([run.info.experiment_id])) == 1 and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 2, 3]
    assert run.data.tags["provenance.from_step"] == "1"
    wandb_id = (trackers_dir(run_dir) / "wandb.id").read_text()
    (first, _, before), (second, config, after) = [run for run in wandb_runs(run_dir) if run[0] == wandb_id]
    assert config["provenance"]["from_step"] == 1
    assert [row["step"] for row in before] == [1, 2] and [row["step"] for row in after] == [2, 3]

    # Other settings start from step 0 in the same directory: new tracker runs, TensorBoard shows only the new one.
    retrained = trainer.train(tiny_model_dir, arithmetic_parquet, run_dir,
                              settings=settings_for("grpo", steps=2, lr=5e-4, loggers=ALL))
    logged = tensorboard_scalars(run_dir).Scalars("lr")
    assert [e.step for e in logged] == [1, 2] and [e.value for e in logged] == pytest.approx(retrained["lr"])
    client, rerun = mlflow_run(run_dir)
    assert rerun.info.run_id != run.info.run_id and rerun.data.params["train.lr"] == "0.0005"
    assert len(client.search_runs([run.info.experiment_id])) == 2
    assert (trackers_dir(run_dir) / "wandb.id").read_text() not in (wandb_id, "")


def test_an_unknown_logger_is_refused_at_validation_naming_its_key():
    with pytest.raises(ConfigError, match=r"config\.train\.loggers\[1\]: unknown tracker 'comet' \(known: mlflow, "
                                          r"tensorboard, wandb\)"):
        validate_config({"train": {"loggers": ["tensorboard", "comet"]}})
    with pytest.raises(ConfigError, match=r"^train\.loggers\[0\]: unknown tracker 'comet'"):
        parse_settings(job_settings("train", train={"loggers": ["comet"]}), "train")
    with pytest.raises(ConfigError, match="non-unique"):
        validate_config({"train": {"loggers": ["wandb", "wandb"]}})


@pytest.mark.parametrize(("name", "module", "package"), [("tensorboard", "torch.utils.tensorboard", "tensorboard"),
                                                         ("wandb", "wandb", "wandb"),
                                                         ("mlflow", "mlflow", "mlflow-skinny")])
def test_a_missing_package_names_the_key_and_the_extra(tmp_path, monkeypatch, name, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # importing it fails, as when it is not installed
    with pytest.raises(ImportError, match=rf"train\.loggers lists '{name}', which needs the {package} package: "
                                          rf"pip install 'kalmanrl\[trackers\]'"):
        start_trackers([name], tmp_path, run_name="m/t/a/seed0", settings={}, provenance={}, start_step=0)


class Recording(Tracker):
    closed: list[str] = []

    def start(self, run_dir, run_name, settings, provenance, *, start_step):
        self.name = run_name

    def log(self, metrics, step):
        if metrics["loss"] != metrics["loss"]:
            raise ValueError("the tracker refused a NaN")

    def close(self):
        Recording.closed.append(self.name)


class Unstartable(Recording):
    def start(self, run_dir, run_name, settings, provenance, *, start_step):
        raise ConnectionError("no server")


@pytest.fixture
def registered():
    TRACKERS.register("recording", Recording)
    TRACKERS.register("unstartable", Unstartable)
    Recording.closed.clear()
    yield
    TRACKERS.unregister("recording")
    TRACKERS.unregister("unstartable")


def test_trackers_close_together_and_a_failed_log_raises(tmp_path, registered):
    with pytest.raises(ConnectionError):
        start_trackers(["recording", "unstartable"], tmp_path, run_name="first", settings={}, provenance={},
                       start_step=0)
    assert Recording.closed == ["first"]  # the tracker started before the failure is closed
    started = start_trackers(["recording"], tmp_path, run_name="second", settings={}, provenance={}, start_step=0)
    started.log({"loss": 1.0}, 1)
    with pytest.raises(ValueError, match="NaN"):
        started.log({"loss": float("nan")}, 2)
    started.close()
    assert Recording.closed == ["first", "second"]
