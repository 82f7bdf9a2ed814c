"""A finished run's numbers against the numbers the repository expects for its config, exactly.

The expected summary (e.g. config/smoke.expected.json) holds, for every row of a report's summary.parquet, its key
(model, task, algorithm, seed, step, benchmark), the metrics and the sha256 of the evaluated weights. A run on
another machine, or in a container, that reproduces the study gives the same values bit for bit; anything else is a
difference, listed by row and column. Provenance (versions, machine, commit, paths) is not compared: it says where a
run happened, not what it computed.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

from kalmanrl.io import atomic_path

KEY = ("model", "task", "algorithm", "seed", "step", "benchmark")
VALUE = re.compile(r"^(n_problems|k|n_samples|avg_at_k|maj_at_k|mean_length|truncation_rate|pass_at_\d+|sha256_model)$")


def _plain(value):
    """A cell as JSON: numpy scalars as Python numbers, missing values (pandas NA, NaN) as None."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def expected_rows(summary: pd.DataFrame) -> dict:
    """The part of a summary that a reproduction must equal: {key, columns, rows}, rows sorted by key."""
    key = [c for c in KEY if c in summary.columns]
    columns = [c for c in summary.columns if VALUE.match(c)]
    if not key or not columns:
        raise ValueError(f"not a report summary: key columns {key}, value columns {columns}")
    frame = summary[key + columns].sort_values(key, na_position="first")
    rows = [{c: _plain(v) for c, v in zip(frame.columns, values)} for values in frame.itertuples(index=False)]
    return {"key": key, "columns": columns, "rows": rows}


def write_expected(summary_path: str | Path, expected_path: str | Path) -> dict:
    """Record a finished run's summary.parquet as the expected summary (floats written so they read back exactly)."""
    expected = expected_rows(pd.read_parquet(summary_path))
    with atomic_path(expected_path) as tmp:
        Path(tmp).write_text(json.dumps(expected, indent=1) + "\n")
    return expected


def _same(a, b) -> bool:
    """Exact equality; two NaNs are the same."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def compare_summary(summary_path: str | Path, expected_path: str | Path) -> list[str]:
    """Every difference between a run's summary.parquet and the expected summary: missing or extra rows, and each
    (row, column) whose value is not exactly the expected one. Empty when the run reproduces it."""
    expected = json.loads(Path(expected_path).read_text())
    actual = expected_rows(pd.read_parquet(summary_path))
    key = expected["key"]
    if actual["key"] != key:
        return [f"key columns differ: run {actual['key']}, expected {key}"]
    ident = lambda row: tuple(row.get(c) for c in key)  # noqa: E731
    got = {ident(row): row for row in actual["rows"]}
    want = {ident(row): row for row in expected["rows"]}
    differences = [f"missing row {dict(zip(key, k))}" for k in want if k not in got]
    differences += [f"unexpected row {dict(zip(key, k))}" for k in got if k not in want]
    for k in want.keys() & got.keys():
        for column in expected["columns"]:
            if column not in got[k]:
                differences.append(f"{dict(zip(key, k))}: column {column} missing from the run")
            elif not _same(got[k][column], want[k][column]):
                differences.append(f"{dict(zip(key, k))}: {column} = {got[k][column]!r}, "
                                   f"expected {want[k][column]!r}")
    return sorted(differences)
