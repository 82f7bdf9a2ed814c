"""The numbers the papers publish (published.yaml): PUBLISHED, NOT REPRODUCED here. Read into frames and matched to
our rows only where model, task, benchmark and algorithm (or comparison) are the same. Every number says which paper
version and table it was taken from and whether it was checked against the paper itself or only against a secondary
source that quotes it; the report marks the second kind wherever it shows one, so it never passes for the paper's."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pandas as pd
import yaml

CHECKED = {"paper": "checked against the paper",
           "secondary": "NOT checked against the paper, only against a secondary source"}
SECONDARY = "secondary"  # the mark beside a value checked only against a secondary source
SECONDARY_NOTE = (f"A published value marked ({SECONDARY}) was checked only against a secondary source quoting the "
                  "paper, not against the paper itself.")
PROVENANCE = ("version", "table", "checked")
CONTEXT = ("paper", "source", "config", *PROVENANCE, "model", "task")


def published_numbers(path: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(accuracy, differences) the papers publish, one row per setting, each with its source, paper version, table
    and how it was checked (a paper's keys apply to each of its rows unless the row sets its own). Accuracy is
    percent, differences percentage points. Reads the package's published.yaml unless `path` is given."""
    shipped = resources.files("kalmanrl.reporting").joinpath("published.yaml")
    text = Path(path).read_text() if path else shipped.read_text()
    accuracy, differences = [], []
    for paper in yaml.safe_load(text):
        context = {k: paper[k] for k in CONTEXT if k in paper}
        accuracy += [_with_provenance({**context, **row}) for row in paper.get("accuracy", [])]
        differences += [_with_provenance({**context, **row}) for row in paper.get("differences", [])]
    return pd.DataFrame(accuracy), pd.DataFrame(differences)


def _with_provenance(row: dict) -> dict:
    """`row`, refused unless it says where it was taken from and how it was checked: a number without that would be
    shown as the paper's."""
    if any(k not in row for k in PROVENANCE) or row["checked"] not in CHECKED:
        raise ValueError(f"published number {row} needs {', '.join(PROVENANCE)} (checked: "
                         f"{' or '.join(CHECKED)})")
    return row


def paper_matches(table: pd.DataFrame, published: pd.DataFrame, keys: list[str],
                  value: str) -> list[pd.Series | None]:
    """For each row of `table`, the published row with a `value` whose `keys` (model, task, benchmark, algorithm or
    comparison) are the same, else None."""
    if published.empty or value not in published:
        return [None] * len(table)
    rows = published.dropna(subset=[value])
    for key in {"task", "benchmark"} & set(rows):  # a published number may stand for several names
        rows = rows.explode(key)
    found = {_key(row, keys): row for _, row in rows.iterrows()}
    return [found.get(_key(row, keys)) for _, row in table.iterrows()]


def _key(row: pd.Series, keys: list[str]) -> tuple[str, ...]:
    return tuple(str(v).lower() for v in row[keys])


def paper_column(matches: list[pd.Series | None], value: str) -> list[str]:
    """The matched published values as shown, blank where none matched; one checked only against a secondary source
    is marked so."""
    return ["" if row is None else f"{row[value]:.2f}" + ("" if row["checked"] == "paper" else f" ({SECONDARY})")
            for row in matches]


def published_sources(*tables: pd.DataFrame) -> dict[str, str]:
    """Paper name -> its citation with the version and table its numbers come from and how they were checked, over
    every published table given."""
    frames = [t for t in tables if len(t)]
    if not frames:
        return {}
    sources = {}
    for paper, group in pd.concat(frames, ignore_index=True).groupby("paper", sort=False):
        shown = group.assign(checked=group["checked"].map(CHECKED))
        version, table, checked = (" / ".join(dict.fromkeys(shown[k])) for k in PROVENANCE)
        sources[paper] = f"{shown['source'].iloc[0]} (version: {version}; table: {table}; {checked})"
    return sources


def published_display(accuracy: pd.DataFrame, differences: pd.DataFrame) -> pd.DataFrame:
    """Both kinds of published numbers in one table (sources in the note), each with how it was checked, several
    names joined by " / "."""
    table = pd.concat([accuracy, differences], ignore_index=True).drop(columns="source", errors="ignore")
    if "checked" in table:
        table["checked"] = table["checked"].map(CHECKED)
    return table.map(lambda v: " / ".join(v) if isinstance(v, list) else v).fillna("")
