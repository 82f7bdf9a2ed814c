"""The numbers the papers publish (published.yaml): PUBLISHED, NOT REPRODUCED here. Read into frames and matched to
our rows only where model, task, benchmark and algorithm (or comparison) are the same."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pandas as pd
import yaml


def published_numbers(path: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(accuracy, differences) the papers publish, one row per setting, each with its source. Accuracy is percent,
    differences percentage points. Reads the package's published.yaml unless `path` is given."""
    text = Path(path).read_text() if path else resources.files("kalmanrl").joinpath("published.yaml").read_text()
    accuracy, differences = [], []
    for paper in yaml.safe_load(text):
        context = {k: paper[k] for k in ("paper", "source", "model", "task") if k in paper}
        accuracy += [{**context, **row} for row in paper.get("accuracy", [])]
        differences += [{**context, **row} for row in paper.get("differences", [])]
    return pd.DataFrame(accuracy), pd.DataFrame(differences)


def paper_column(table: pd.DataFrame, published: pd.DataFrame, keys: list[str], value: str) -> list[str]:
    """The published value where (model, task, benchmark, algorithm or comparison) match, else blank."""
    if published.empty or value not in published:
        return [""] * len(table)
    rows = published.dropna(subset=[value])
    for key in {"task", "benchmark"} & set(rows):  # a published number may stand for several names
        rows = rows.explode(key)
    found = {tuple(str(v).lower() for v in row[keys]): row[value] for _, row in rows.iterrows()}
    return [f"{found[k]:.2f}" if k in found else "" for k in
            (tuple(str(v).lower() for v in row[keys]) for _, row in table.iterrows())]


def published_sources(*tables: pd.DataFrame) -> dict[str, str]:
    """Paper name -> its citation, over every published table given."""
    return {p: s for t in tables if len(t) for p, s in zip(t["paper"], t["source"])}


def published_display(accuracy: pd.DataFrame, differences: pd.DataFrame) -> pd.DataFrame:
    """Both kinds of published numbers in one table (sources in the note), several names joined by " / "."""
    table = pd.concat([accuracy, differences], ignore_index=True).drop(columns="source", errors="ignore")
    return table.map(lambda v: " / ".join(v) if isinstance(v, list) else v).fillna("")
