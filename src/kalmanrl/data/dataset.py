"""The dataset table: one Parquet schema for every dataset, checked when a table is made, written and read back.

Every loader's rows become a table of `DATASET_SCHEMA` (`check_table`); `write_dataset` stores it and `read_dataset`
checks it again on the way back in, so a stage never trains or evaluates on a file of another shape.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kalmanrl.core.io import atomic_path

REQUIRED_COLUMNS = ("id", "source", "split", "problem", "answer")
DATASET_SCHEMA = pa.schema(
    [pa.field(name, pa.string(), nullable=False) for name in REQUIRED_COLUMNS]
    + [pa.field("solution", pa.string()), pa.field("subject", pa.string()), pa.field("level", pa.int64()),
       pa.field("num_terms", pa.int64()), pa.field("num_digits", pa.int64())])
SPLITS = ("train", "test")


class DataError(ValueError):
    """A dataset that cannot be built or read; the message names the file (and line) or the hub row."""


def check_table(table: pa.Table, where: str) -> pa.Table:
    """`table` with DATASET_SCHEMA's columns in order (absent optional ones as nulls), after checking names, types,
    required values and split names; errors name `where` and the column."""
    unknown = set(table.column_names) - set(DATASET_SCHEMA.names)
    if unknown:
        raise DataError(f"{where}: unknown column(s) {', '.join(sorted(unknown))}; schema: {DATASET_SCHEMA.names}")
    columns = []
    for spec in DATASET_SCHEMA:
        if spec.name not in table.column_names:
            if not spec.nullable:
                raise DataError(f"{where}: missing required column {spec.name!r}")
            columns.append(pa.nulls(table.num_rows, spec.type))
            continue
        column = table[spec.name]
        if column.type != spec.type and not pa.types.is_null(column.type):
            raise DataError(f"{where}: column {spec.name!r} has type {column.type}, expected {spec.type}")
        if not spec.nullable and column.null_count:
            raise DataError(f"{where}: column {spec.name!r} has {column.null_count} null value(s)")
        columns.append(column.cast(spec.type))
    table = pa.Table.from_arrays(columns, schema=DATASET_SCHEMA)
    bad_splits = set(table["split"].to_pylist()) - set(SPLITS)
    if bad_splits:
        raise DataError(f"{where}: column 'split' has {sorted(bad_splits)}; allowed: {', '.join(SPLITS)}")
    first: dict[tuple[str, str], int] = {}
    for index, (split, ident) in enumerate(zip(table["split"].to_pylist(), table["id"].to_pylist(), strict=True)):
        if first.setdefault((split, ident), index) != index:
            raise DataError(f"{where}: column 'id' is not unique within a split: id {ident!r} of split {split!r} "
                            f"at rows {first[split, ident]} and {index}")
    return table


def write_dataset(table: pa.Table, path: str | Path) -> None:
    """Check and write atomically (a temporary sibling, then one rename); an empty table is refused."""
    table = check_table(table, str(path))
    if table.num_rows == 0:
        raise DataError(f"{path}: refusing to write an empty dataset")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_dataset(path: str | Path, split: str | None = None) -> pa.Table:
    """A dataset Parquet file, checked against DATASET_SCHEMA; with `split`, only that split's rows (which must
    exist)."""
    table = check_table(pq.read_table(path), str(path))
    if split is None:
        return table
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    table = table.filter(pc.equal(table["split"], split))
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows in split {split!r}")
    return table
