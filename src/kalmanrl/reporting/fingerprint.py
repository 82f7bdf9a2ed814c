"""Stage fingerprints of a finished results tree: what each stage of the DAG produced, in the DAG's order, so that a
run on another machine can be placed against a recorded one: the first stage, and the first step within it, at which
the two part.

- data: the sha256 of every dataset and task train split (integer and text work only: equal on any machine);
- tokenizer and base model: the sha256 of each model's tokenizer.json and initial weights;
- warm start: its loss at every step (metrics.parquet beside the weights) and the sha256 of its weights;
- train: each run's reward, loss and gradient norm at every RL step (metrics.parquet) and the sha256 of its final
  weights.
The evaluations' numbers are the report summary's rows (kalmanrl.reporting.expected).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kalmanrl.core.layout import (
    BASE_MODEL,
    DATASET,
    FINAL,
    METRICS,
    RUN_DIR,
    TRAIN_SPLIT,
    WARM_START_MODEL,
    fields,
    fill,
    parse,
)
from kalmanrl.runtime.provenance import files_sha256

STAGES = ("data", "tokenizer", "base model", "warm start", "train")
TRAIN_SERIES = ("reward_mean", "loss", "grad_norm")  # per RL step, from the run's metrics.parquet
WARM_START_SERIES = ("loss",)  # per supervised step
MISSING = "missing from the run"


@dataclass(frozen=True)
class Fingerprint:
    """One stage's output: `name` says which (a dataset, a model, a run), `sha256` hashes its bytes, `series` holds
    its per-step values ({name: [value of step 1, 2, ...]})."""
    stage: str
    name: str
    sha256: str | None = None
    series: dict[str, list[float]] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"stage": self.stage, "name": self.name, "sha256": self.sha256,
                **({"series": self.series} if self.series else {})}

    @classmethod
    def from_json(cls, data: dict) -> Fingerprint:
        return cls(data["stage"], data["name"], data.get("sha256"), data.get("series", {}))


def weights_sha256(model_dir: Path) -> str:
    """The sha256 of a save_pretrained directory's weights (the summary's sha256_model hashes the same files)."""
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no model*.safetensors")
    return files_sha256(files)


def _series(metrics: Path, columns: Iterable[str]) -> dict[str, list[float]]:
    """Per-step values of `columns` from a metrics.parquet, in step order ({} where the run kept none)."""
    if not metrics.exists():
        return {}
    frame = pd.read_parquet(metrics).sort_values("step")
    return {c: [float(v) for v in frame[c]] for c in columns if c in frame}


def _matches(root: Path, template: str) -> list[tuple[dict[str, str], Path]]:
    """Every path under `root` that fills `template` (its wildcards as text), in sorted order."""
    pattern = fill(template, **{name: "*" for name in fields(template)})
    found = []
    for path in sorted(root.glob(pattern)):
        ident = parse(template, path.relative_to(root).as_posix())
        if ident is not None:
            found.append((ident, path))
    return found


def fingerprints(results_dir: str | Path) -> list[Fingerprint]:
    """Every stage's fingerprint of the finished results tree under `results_dir`, in STAGES order."""
    root = Path(results_dir)
    out = [Fingerprint("data", path.name, files_sha256([path]))
           for template in (DATASET, TRAIN_SPLIT) for _, path in _matches(root, template)]
    bases = _matches(root, BASE_MODEL)
    out += [Fingerprint("tokenizer", ident["model"], files_sha256([path / "tokenizer.json"]))
            for ident, path in bases if (path / "tokenizer.json").exists()]
    out += [Fingerprint("base model", ident["model"], weights_sha256(path)) for ident, path in bases]
    out += [Fingerprint("warm start", f"{ident['model']}/{ident['task']}", weights_sha256(path),
                        _series(path / METRICS, WARM_START_SERIES))
            for ident, path in _matches(root, WARM_START_MODEL)]
    out += [Fingerprint("train", path.relative_to(root / "runs").as_posix(), weights_sha256(path / FINAL),
                        _series(path / METRICS, TRAIN_SERIES))
            for _, path in _matches(root, RUN_DIR) if (path / FINAL).is_dir()]
    return out


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def series_departure(got: dict[str, list[float]], want: dict[str, list[float]]) -> str | None:
    """Where two runs' per-step values first part: "step N: <name> a, recorded b (relative d)", or None when every
    recorded value is equal (NaN equals NaN)."""
    steps = max((len(v) for v in want.values()), default=0)
    for step in range(steps):
        for name, values in want.items():
            mine = got.get(name, [])
            if step >= len(mine):
                return f"step {step + 1}: {name} missing, recorded {values[step]!r}"
            a, b = mine[step], values[step]
            if a != b and not (math.isnan(a) and math.isnan(b)):
                return f"step {step + 1}: {name} {a!r}, recorded {b!r} (relative {_relative(a, b):.1e})"
    return None


def departures(got: list[Fingerprint], want: list[Fingerprint]) -> list[tuple[str, str]]:
    """Every recorded stage output the run does not reproduce exactly, in STAGES order, as (stage, "<stage> <name>:
    ...") naming the first differing step where the stage has per-step values."""
    mine = {(f.stage, f.name): f for f in got}
    lines = []
    for recorded in sorted(want, key=lambda f: STAGES.index(f.stage)):
        label = f"{recorded.stage} {recorded.name}"
        run = mine.get((recorded.stage, recorded.name))
        if run is None:
            lines.append((recorded.stage, f"{label}: {MISSING}"))
        elif (where := series_departure(run.series, recorded.series)) is not None:
            lines.append((recorded.stage, f"{label}: departs at {where}"))
        elif run.sha256 != recorded.sha256:
            lines.append((recorded.stage, f"{label}: sha256 {run.sha256}, recorded {recorded.sha256}"
                          + (" (every per-step value equal)" if recorded.series else "")))
    return lines
