"""Reading the evaluation results tree into frames: which run a summary file belongs to, the runs' last evaluated
steps, and one run's correctness as a seeds x problems matrix. The names of the grid's roles live here too (the warm
start's is the results tree's, kalmanrl.core.layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kalmanrl.core.io import read_parquet
from kalmanrl.core.layout import parse_evaluation, parse_run_name

BASELINE = "grpo"
CELL = ["model", "task", "benchmark"]
RUN = ["model", "task", "algorithm", "seed"]
NO_SEED = -1  # the warm start has no RL seed; it is the same policy for every seed of every algorithm


def load_frames(paths: list[Path]) -> pd.DataFrame:
    """Concatenate the Parquet files that exist (a grid may still be running)."""
    frames = [read_parquet(p) for p in paths if Path(p).exists()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def summary_ident(path: str | Path) -> dict | None:
    """The cell and run a summary file of the results tree (kalmanrl.core.layout.EVAL_FILE) is the final evaluation of:
    model, task, algorithm, seed (NO_SEED for the warm start), benchmark. None for a kept checkpoint's summary (its
    run's final summary names the cell) and for any path outside the tree."""
    ident = parse_evaluation(path)
    if ident is None or ident["kind"] != "summary":
        return None
    run = parse_run_name(ident["run"])
    if "step" in run:
        return None
    return {"model": ident["model"], "task": ident["task"], "algorithm": run["algorithm"],
            "seed": int(run["seed"]) if "seed" in run else NO_SEED, "benchmark": ident["benchmark"]}


def final_steps(frame: pd.DataFrame) -> pd.DataFrame:
    """Keep each run's last evaluated step per benchmark (intermediate checkpoints feed only the step curves)."""
    if frame.empty:
        return frame
    keys = [*RUN, "benchmark"]
    last = frame.groupby(keys, dropna=False)["step"].transform("max")
    return frame[frame["step"] == last]


def with_seed_label(frame: pd.DataFrame) -> pd.DataFrame:
    """Seed as a plain int column, NO_SEED for the warm start, so groupby and joins treat it like any other run."""
    if frame.empty:
        return frame
    return frame.assign(seed=frame["seed"].astype("Int64").fillna(NO_SEED).astype(int))


def select(frame: pd.DataFrame, key: dict) -> pd.DataFrame:
    """The rows of `frame` whose columns equal every value of `key`."""
    if frame.empty:
        return frame
    mask = np.logical_and.reduce([frame[k] == v for k, v in key.items()])
    return frame[mask]


def correctness_matrix(details: pd.DataFrame) -> pd.DataFrame:
    """Mean correctness over samples per (seed, problem): rows are seeds, columns problem ids, shape [S, P]."""
    return details.pivot_table(index="seed", columns="problem_id", values="correct", aggfunc="mean")
