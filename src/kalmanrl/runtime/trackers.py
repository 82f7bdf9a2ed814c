"""Experiment trackers (`train.loggers`): where rank 0 of a training job sends every step's float metrics besides
`metrics.parquet`, with the resolved settings and the environment (provenance) logged once at start.

A tracker is a small class in a registry, so a plugin can add one (`register_tracker`): `start` once, `log` every
step, `close` at the end. Each imports its package only when chosen, so none is a dependency of kalmanrl; a missing
one fails at start, naming `train.loggers` and the extra that installs it. A tracker never drops a step quietly:
whatever its library reports as a failure raises (TensorBoard is flushed every step, so its writer's errors surface
at that step).

A resumed run logs on from its checkpoint's step into the tracker run its first start created (its id is kept in
the run directory, `layout.trackers_dir`); a run that starts from step 0 gets a new tracker run, so a run retrained
with other settings never mixes into the old one's curves."""

from __future__ import annotations

import abc
import contextlib
import importlib
import json
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from kalmanrl.core.io import atomic_path
from kalmanrl.core.layout import trackers_dir
from kalmanrl.core.registry import Registry

EXTRA = "trackers"  # the pip extra that installs every built-in tracker's package


class Tracker(abc.ABC):
    """One experiment tracker of one training run."""

    @abc.abstractmethod
    def start(self, run_dir: Path, run_name: str, settings: Mapping[str, Any], provenance: Mapping[str, Any], *,
              start_step: int) -> None:
        """Open the tracker run of the training run in `run_dir` and log its resolved settings and this start's
        environment. `start_step`: the steps already done (0, or the checkpoint's step a resumed run goes on from)."""

    @abc.abstractmethod
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log one step's metrics; raise rather than drop them."""

    @abc.abstractmethod
    def close(self) -> None:
        """Write out everything logged and end the tracker run."""


TRACKERS: Registry[type[Tracker]] = Registry("tracker")


def register_tracker(name: str) -> Callable[[type[Tracker]], type[Tracker]]:
    """Class decorator: make a `Tracker` subclass a name `train.loggers` can list."""
    return TRACKERS.register(name)


class Trackers:
    """The started trackers of `train.loggers` as one: each step's metrics go to every one; `close` closes every one,
    also when another's close fails."""

    def __init__(self, trackers: Sequence[Tracker], closing: contextlib.ExitStack):
        self.trackers = list(trackers)
        self._closing = closing

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def close(self) -> None:
        self._closing.close()


def start_trackers(names: Sequence[str], run_dir: str | Path, *, run_name: str, settings: Mapping[str, Any],
                   provenance: Mapping[str, Any], start_step: int) -> Trackers:
    """Start the trackers `names` (train.loggers) of the training run in `run_dir`; when one fails to start, those
    already started are closed."""
    with contextlib.ExitStack() as closing:
        started = []
        for name in names:
            tracker = TRACKERS.bind(name)
            tracker.start(Path(run_dir), run_name, settings, provenance, start_step=start_step)
            closing.callback(tracker.close)
            started.append(tracker)
        return Trackers(started, closing.pop_all())


def import_package(module: str, tracker: str, package: str) -> ModuleType:
    """`module`, or an error naming train.loggers and what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"train.loggers lists {tracker!r}, which needs the {package} package: pip install "
                          f"'kalmanrl[{EXTRA}]' (or pip install {package})") from err


def stored_run_id(run_dir: Path, tracker: str, start_step: int) -> str | None:
    """The id of the tracker run a resumed training run goes on logging into (None when it starts from step 0, or
    when no start stored one)."""
    path = _run_id_file(run_dir, tracker)
    return path.read_text().strip() if start_step and path.exists() else None


def store_run_id(run_dir: Path, tracker: str, run_id: str) -> str:
    """Keep a new tracker run's id in the run directory for the resumes to come; returns it."""
    with atomic_path(_run_id_file(run_dir, tracker)) as tmp:
        tmp.write_text(run_id)
    return run_id


def _run_id_file(run_dir: Path, tracker: str) -> Path:
    return trackers_dir(run_dir) / f"{tracker}.id"


def flat(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested mapping as dotted keys and text values (JSON for all but strings): what MLflow takes as params."""
    if isinstance(value, Mapping) and value:
        return {key: text for name, item in value.items() for key, text in flat(item, f"{prefix}{name}.").items()}
    return {prefix.removesuffix("."): value if isinstance(value, str) else json.dumps(value)}


@register_tracker("tensorboard")
class TensorBoardTracker(Tracker):
    """TensorBoard event files in `<run dir>/trackers/tensorboard` (torch's SummaryWriter): a scalar per metric, the
    settings and the environment as text. TensorBoard hides what earlier event files there hold from the first step
    this start logs on (`purge_step`): a resumed run's steps the interrupted one logged past its checkpoint, and
    everything of a run that an unresumed start replaces."""

    def start(self, run_dir, run_name, settings, provenance, *, start_step):
        tensorboard = import_package("torch.utils.tensorboard", "tensorboard", "tensorboard")
        self.writer = tensorboard.SummaryWriter(trackers_dir(run_dir) / "tensorboard",
                                                purge_step=start_step + 1 if start_step else 0)
        for tag, value in (("settings", settings), ("provenance", provenance)):
            self.writer.add_text(tag, f"```\n{json.dumps(value, indent=1)}\n```", start_step)
        self.writer.flush()

    def log(self, metrics, step):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


@register_tracker("wandb")
class WandbTracker(Tracker):
    """A Weights & Biases run named model/task/algorithm/seed in the project $WANDB_PROJECT (default "kalmanrl"),
    its files under $WANDB_DIR (default `<run dir>/trackers`); $WANDB_MODE=offline keeps it on disk for `wandb sync`.
    The config holds the settings and the environment. Metrics are plotted against the training `step`, logged with
    them, rather than wandb's own step, which would drop a resumed run's steps past the last one it saw."""

    def start(self, run_dir, run_name, settings, provenance, *, start_step):
        wandb = import_package("wandb", "wandb", "wandb")
        directory = Path(os.environ.get("WANDB_DIR") or trackers_dir(run_dir))
        directory.mkdir(parents=True, exist_ok=True)
        run_id = stored_run_id(run_dir, "wandb", start_step) or store_run_id(run_dir, "wandb", uuid.uuid4().hex[:16])
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "kalmanrl"), name=run_name, dir=directory,
                              id=run_id, resume="allow", reinit="create_new")
        self.run.config.update({"settings": settings, "provenance": provenance}, allow_val_change=True)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, metrics, step):
        self.run.log({**metrics, "step": step})

    def close(self):
        self.run.finish()


@register_tracker("mlflow")
class MlflowTracker(Tracker):
    """An MLflow run named model/task/algorithm/seed in the experiment $MLFLOW_EXPERIMENT_NAME (default "kalmanrl")
    at $MLFLOW_TRACKING_URI (default: an SQLite store, `<run dir>/trackers/mlflow.db`, MLflow's file store being
    deprecated). The flattened settings are its params (logged by the first start: params cannot change), this
    start's environment its `provenance.*` tags, and every metric is logged at its step."""

    def start(self, run_dir, run_name, settings, provenance, *, start_step):
        import_package("mlflow", "mlflow", "mlflow-skinny")
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        local = trackers_dir(run_dir)
        local.mkdir(parents=True, exist_ok=True)
        remote = os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(remote or f"sqlite:///{(local / 'mlflow.db').resolve()}")
        self.run_id = stored_run_id(run_dir, "mlflow", start_step)
        if self.run_id is None:
            experiment = self._experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "kalmanrl"),
                                          None if remote else (local / "mlflow-artifacts").resolve().as_uri())
            self.run_id = store_run_id(run_dir, "mlflow",
                                       self.client.create_run(experiment, run_name=run_name).info.run_id)
            self.client.log_batch(self.run_id, params=[Param(key, value) for key, value in flat(settings).items()])
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        self.client.log_batch(self.run_id,
                              tags=[RunTag(f"provenance.{key}", str(value)) for key, value in provenance.items()])

    def _experiment(self, name: str, artifacts: str | None) -> str:
        """The experiment's id, created (its artifacts at `artifacts`, else the server's default) when missing;
        another job may create it meanwhile."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifacts)
            except MlflowException:
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        return found.experiment_id

    def log(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    def close(self):
        self.client.set_terminated(self.run_id)
