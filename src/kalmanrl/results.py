"""Reading the evaluation results tree into frames: which run a summary file belongs to, the runs' last evaluated
steps, and one run's correctness as a seeds x problems matrix. The names of the grid's roles live here too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kalmanrl.io import read_parquet

BASELINE = "grpo"
WARM_START = "sft"
CELL = ["model", "task", "benchmark"]
RUN = ["model", "task", "algorithm", "seed"]
NO_SEED = -1  # the warm start has no RL seed; it is the same policy for every seed of every algorithm


def load_frames(paths: list[Path]) -> pd.DataFrame:
    """Concatenate the Parquet files that exist (a grid may still be running)."""
    frames = [read_parquet(p) for p in paths if Path(p).exists()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def summary_ident(path: str | Path) -> dict | None:
    """The identification a summary path encodes in the workflow layout
    `.../{model}/{task}/{sft | <algorithm>/seed<n>}/{benchmark}.summary.parquet`; None for any other layout."""
    parts = Path(path).parts
    if not parts[-1].endswith(".summary.parquet"):
        return None
    benchmark = parts[-1].removesuffix(".summary.parquet")
    if len(parts) >= 4 and parts[-2] == WARM_START:
        return {"model": parts[-4], "task": parts[-3], "algorithm": WARM_START, "seed": NO_SEED, "benchmark": benchmark}
    if len(parts) >= 5 and parts[-2].startswith("seed") and parts[-2][4:].isdigit():
        return {"model": parts[-5], "task": parts[-4], "algorithm": parts[-3], "seed": int(parts[-2][4:]),
                "benchmark": benchmark}
    return None


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
