"""Atomic outputs: a job killed half-way must never leave a file or directory that looks finished, because
Snakemake (and a user) judge completeness by existence."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_path(path: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write into; on success it replaces `path` in one rename, on failure it
    is removed. Works for files and (with directory=True) for save_pretrained directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
        if directory and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def remove_temporaries(path: str | Path) -> None:
    """Remove what `atomic_path` left of `path` (a glob in its last part) when a job was killed inside the block: the
    temporary siblings never renamed into place, which nothing else would ever remove. Only for a caller that is the
    one writer there (a training job holds its run directory's lock)."""
    path = Path(path)
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _umask() -> int:
    """The process umask (temp files are created private; the result should get the usual permissions)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def not_utf8(err: UnicodeDecodeError) -> str:
    """What a file that failed to decode holds, for an error that names it: the first offending byte and where."""
    return f"not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at offset {err.start})"


def write_parquet(data: pa.Table | pd.DataFrame, path: str | Path) -> None:
    """Write a table atomically."""
    table = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()
