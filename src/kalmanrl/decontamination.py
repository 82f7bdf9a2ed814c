"""Decontamination: training problems that also appear in a benchmark are dropped, compared as normalised text."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

import pyarrow as pa


def normalize_problem(text: str) -> str:
    """A problem's text for duplicate detection: Unicode-normalised, lower case, without whitespace, `$` signs or
    trailing punctuation, so copies that differ only in spacing or math-mode delimiters compare equal."""
    text = unicodedata.normalize("NFKC", text).lower().replace("$", "")
    return re.sub(r"\s+", "", text).rstrip(".?!:;,")


def drop_problems(table: pa.Table, problems: Iterable[str]) -> tuple[pa.Table, int]:
    """Drop the training rows whose normalised problem text is among `problems`; returns the table and the count."""
    keys = {normalize_problem(p) for p in problems}
    if not keys:
        return table, 0
    keep = [split != "train" or normalize_problem(problem) not in keys
            for split, problem in zip(table["split"].to_pylist(), table["problem"].to_pylist())]
    kept = table.filter(pa.array(keep))
    return kept, table.num_rows - kept.num_rows


def decontaminate(table: pa.Table, benchmarks: Iterable[pa.Table]) -> tuple[pa.Table, int]:
    """`table` without the training problems that appear in any of the benchmark tables; returns the drop count."""
    return drop_problems(table, (p for b in benchmarks for p in b["problem"].to_pylist()))
