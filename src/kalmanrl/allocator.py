"""glibc's malloc set up for a PyTorch process on the CPU: memory a training step frees is kept for the next step
instead of being handed back to the kernel and faulted in again, page by page.

PyTorch's CPU tensors come from plain malloc. glibc serves a block above its mmap threshold (128 KiB at first,
raised as large blocks are freed, up to 32 MiB) with a fresh mapping and unmaps it on free, and hands the top of its
heap back to the kernel once more than the trim threshold is free there. A step's activations, logits and gradients
are such blocks: every step the kernel zero-fills their pages again, which took about a tenth of the default study's
training step on a 2-core machine (benchmarks/README.md). PyTorch's CPU performance guide recommends a caching
allocator (jemalloc, TCMalloc) for this; `keep_freed_memory` gets the same from glibc with two `mallopt` calls,
equivalent to setting MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ before the process starts. The resident
size then stays near the step's peak between steps, as GPU memory does under PyTorch's CUDA caching allocator.
Results are the same bit for bit: only where the blocks come from changes."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from collections.abc import Mapping

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h) and the values set: the largest mmap threshold glibc accepts on 64-bit systems
# (blocks up to it come from the heap and are reused), and a trim threshold far above any step's working memory.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
# glibc's own settings: a user who sets any of them has chosen, and is left alone.
GLIBC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Raise glibc's mmap and trim thresholds in this process (see the module docstring). Does nothing, and returns
    False, off glibc or when the environment sets glibc's malloc itself; True when the thresholds were set."""
    chosen = [name for name in GLIBC_SETTINGS if name in environ]
    library = platform.libc_ver()[0]
    if chosen or library != "glibc":
        log.debug("malloc left as it is (%s)", ", ".join(chosen) or f"C library: {library or '?'}")
        return False
    libc = ctypes.CDLL(None)  # the C library this process runs on
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        log.warning("glibc refused the malloc thresholds: freed memory goes back to the kernel (slower, same results)")
        return False
    return True
