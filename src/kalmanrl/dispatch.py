"""One CPU instruction set for every numeric library, so that a CPU run gives the same numbers on any x86-64 machine.

torch's own kernels (ATen), oneDNN and MKL each pick their kernels by the CPU they find: ATen by its capability
(AVX2, AVX-512), oneDNN by its ISA, MKL by instruction set *and vendor*. Kernels that add in a different order give
different float results, and a training run amplifies the last bit into different weights. Each library reads an
environment variable that fixes its choice; `pin_cpu_dispatch` sets all three before torch is loaded (the `kalmanrl`
CLI does it first thing, for every stage, and the vLLM engine processes inherit it).

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
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import MutableMapping
from pathlib import Path

DISPATCH_ENV = "KALMANRL_CPU_DISPATCH"
DEFAULT_LEVEL = "avx2"
MKL_VENDOR_NEUTRAL = "COMPATIBLE,STRICT"  # the one MKL branch documented to be the same on Intel and other vendors
# level -> (CPU flags it needs, the libraries' variables that pin it)
LEVELS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "avx2": (("avx2", "fma"), {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                               "MKL_CBWR": MKL_VENDOR_NEUTRAL}),
    "baseline": ((), {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                      "MKL_CBWR": MKL_VENDOR_NEUTRAL}),
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
    if changed and environ is os.environ and "torch" in sys.modules:
        raise DispatchError(f"torch was loaded before the CPU dispatch ({', '.join(changed)}) was pinned; "
                            f"pin it first (run through the kalmanrl CLI)")
    environ.update(variables)
    environ[DISPATCH_ENV] = level
    return level
