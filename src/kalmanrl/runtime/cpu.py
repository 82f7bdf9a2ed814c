"""How a stage process uses the CPU, set up first thing by every `kalmanrl` stage command: one instruction set for every
numeric library (`pin_cpu_dispatch`: the same numbers on any x86-64 machine) and glibc's malloc keeping the memory a
step frees (`keep_freed_memory`: faster steps, the same numbers).

## Dispatch

One CPU instruction set for every numeric library, so that a CPU run gives the same numbers on any x86-64 machine.

torch's own kernels (ATen), oneDNN and MKL each pick their kernels by the CPU they find: ATen by its capability
(AVX2, AVX-512), oneDNN by its ISA, MKL by instruction set *and vendor*. Kernels that add in a different order give
different float results, and a training run amplifies the last bit into different weights. Each library reads an
environment variable that fixes its choice; `pin_cpu_dispatch` sets all three before torch is loaded (the `kalmanrl`
CLI does it first thing, for every stage, and the vLLM engine processes inherit it), and numpy's too (the report's
statistics). MKL's vector-math functions (torch's CPU `exp`, `log`, `sqrt`, `cos`, `sin`) follow no variable: the
code calls `kalmanrl.runtime.vendor_neutral` instead of them.

MKL pins a branch by `MKL_CBWR`, and its documentation says which hold across vendors: the AVX2 branch gives the same
results on every *Intel* CPU with AVX2, and on other vendors' CPUs MKL silently runs its AUTO branch instead (so an
AMD and an Intel machine part at the first matrix product: seen on 2026-12-04); only the COMPATIBLE branch (SSE2
without the approximate rcpps/rsqrtps) is the same on Intel and non-Intel CPUs. So every level pins MKL to
COMPATIBLE, in STRICT mode (results independent of memory alignment, which the non-strict modes are not). It costs
time in matrix products only: about 2x on the default study's sft step (benchmarks/README.md).

Levels ($KALMANRL_CPU_DISPATCH):
- `avx2` (default): ATen's and oneDNN's AVX2 kernels, MKL's COMPATIBLE branch; the same numbers on every x86-64 CPU
  with AVX2 and FMA (Intel or AMD, with or without AVX-512) for the same thread count.
- `baseline`: the kernels every x86-64 CPU has (ATen `default`, oneDNN SSE4.1, MKL COMPATIBLE); the same on any
  x86-64 CPU, slower.
- `native`: nothing pinned: each library takes the best the machine offers (fastest, machine-dependent numbers).
A machine that lacks the pinned level's instructions cannot give the pinned numbers; that is an error, not a
silent fall-back. Results still depend on the thread count (`--threads`, `resources.<stage>.threads`, default 1).

## Memory

glibc's malloc set up for a PyTorch process on the CPU: memory a training step frees is kept for the next step
instead of being handed back to the kernel and faulted in again, page by page.

PyTorch's CPU tensors come from plain malloc. glibc serves a block above its mmap threshold (128 KiB at first,
raised as large blocks are freed, up to 32 MiB) with a fresh mapping and unmaps it on free, and hands the top of its
heap back to the kernel once more than the trim threshold is free there. A step's activations, logits and gradients
are such blocks: every step the kernel zero-fills their pages again, which took about a tenth of the default study's
training step on a 2-core machine (benchmarks/README.md). PyTorch's CPU performance guide recommends a caching
allocator (jemalloc, TCMalloc) for this; `keep_freed_memory` gets the same from glibc with two `mallopt` calls,
equivalent to setting MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ before the process starts. The resident
size then stays near the step's peak between steps, as GPU memory does under PyTorch's CUDA caching allocator.
Results are the same bit for bit: only where the blocks come from changes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

DISPATCH_ENV = "KALMANRL_CPU_DISPATCH"
DEFAULT_LEVEL = "avx2"
MKL_VENDOR_NEUTRAL = "COMPATIBLE,STRICT"  # the one MKL branch documented to be the same on Intel and other vendors
# numpy's dispatched features (numpy._core._multiarray_umath.__cpu_dispatch__) above each level: disabled, numpy
# runs the kernels of the level (its float64 exp and log, for one, have AVX-512 versions and otherwise use glibc's).
NUMPY_AVX512 = "AVX512F AVX512CD AVX512_KNL AVX512_KNM AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR"
NUMPY_ABOVE_SSE3 = f"SSSE3 SSE41 POPCNT SSE42 AVX F16C FMA3 AVX2 {NUMPY_AVX512}"
# level -> (CPU flags it needs, the libraries' variables that pin it)
LEVELS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "avx2": (("avx2", "fma"), {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                               "MKL_CBWR": MKL_VENDOR_NEUTRAL, "NPY_DISABLE_CPU_FEATURES": NUMPY_AVX512}),
    "baseline": ((), {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                      "MKL_CBWR": MKL_VENDOR_NEUTRAL, "NPY_DISABLE_CPU_FEATURES": NUMPY_ABOVE_SSE3}),
    "native": ((), {}),
}


class DispatchError(RuntimeError):
    """The dispatch level cannot be pinned (unknown name, torch already loaded, instructions missing)."""


def cpu_flags() -> set[str]:
    """The instruction-set flags of /proc/cpuinfo's first processor (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def pin_cpu_dispatch(environ: MutableMapping[str, str] = os.environ, *, flags: set[str] | None = None,
                     machine: str | None = None) -> str:
    """Set the variables of the level $KALMANRL_CPU_DISPATCH names (default `avx2`) in `environ` and return the
    level. They override any value already there: the level is the one switch. Non-x86 machines are left native."""
    level = environ.get(DISPATCH_ENV, DEFAULT_LEVEL)
    if level not in LEVELS:
        raise DispatchError(f"${DISPATCH_ENV}={level!r}: unknown level; known: {', '.join(LEVELS)}")
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64"):
        return "native"
    needed, variables = LEVELS[level]
    missing = [flag for flag in needed if flag not in (cpu_flags() if flags is None else flags)]
    if missing:
        raise DispatchError(f"${DISPATCH_ENV}={level}: this CPU lacks {', '.join(missing)}, so it cannot give the "
                            f"{level} numbers; set {DISPATCH_ENV}=baseline (same numbers on any x86-64) or native")
    changed = {name: value for name, value in variables.items() if environ.get(name) != value}
    loaded = [name for name in ("torch", "numpy") if name in sys.modules]
    if changed and environ is os.environ and loaded:
        raise DispatchError(f"{' and '.join(loaded)} loaded before the CPU dispatch ({', '.join(changed)}) was "
                            f"pinned; pin it first (run through the kalmanrl CLI)")
    environ.update(variables)
    environ[DISPATCH_ENV] = level
    return level


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
