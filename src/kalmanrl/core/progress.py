"""Progress bars that suit both a terminal and a Snakemake log file."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable, **kwargs) -> tqdm:
    """tqdm that redraws often on a terminal but writes a line only every 30 s into a log file."""
    return tqdm(iterable, mininterval=0.1 if sys.stderr.isatty() else 30.0, **kwargs)
