"""Which devices a stage computes on.

Snakemake counts GPUs (`resources: gpu=N` against `--resources gpu=<total>`) but never says *which* devices a job
may use, so two GPU jobs started together would both land on device 0. Each stage therefore claims its N devices from
a pool of lock files (one per device) and exports `CUDA_VISIBLE_DEVICES` before torch initialises CUDA. Devices are
found through NVML (or `nvidia-smi -L`) and named by UUID, which means the same device on the host, in a container and
to CUDA, whose own numbering starts at 0 among the devices it is shown.

The locks are `flock`s on open files: the kernel drops them when the holding process exits, also when it is killed,
so a crashed or cancelled job never leaks a device. Under SLURM the scheduler has already placed the job (it sets
`CUDA_VISIBLE_DEVICES` from the job's allocation), so the pool is not used there.

`resolve_device` then picks the torch device, refusing to fall back to the CPU when GPUs were asked for, and
`local_gpu_problem` lets the workflow refuse, before any job starts, a local run whose GPU jobs could not all get
devices.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

VISIBLE = "CUDA_VISIBLE_DEVICES"
LOCK_DIR_ENV = "KALMANRL_GPU_LOCK_DIR"


class DeviceError(Exception):
    """The GPUs a job asked for cannot be given to it; the CLI reports it as a message, not a traceback."""


class DevicesBusy(DeviceError, TimeoutError):
    """Fewer free devices than requested for longer than the timeout."""


class DeviceListError(DeviceError, ValueError):
    """`CUDA_VISIBLE_DEVICES`, or the count asked for, does not fit the devices there are."""


def default_lock_dir() -> Path:
    """One lock directory per user and machine (`$KALMANRL_GPU_LOCK_DIR` overrides it, e.g. to share between users)."""
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / f"kalmanrl-gpus-{os.getuid()}")


@dataclass(frozen=True)
class Gpu:
    """A device CUDA can be given: a whole GPU, or a MIG instance of a GPU in MIG mode (CUDA cannot use such a GPU
    as a whole). `uuid` (GPU-... or MIG-...) names it the same way on the host, in a container and to CUDA;
    `index` is how NVML / nvidia-smi number it here ("1", or "1:0" for MIG instance 0 of GPU 1)."""

    uuid: str
    index: str
    name: str


_SMI_GPU = re.compile(r"^GPU (\d+): (.*?) \(UUID: (GPU-[^)]+)\)\s*$")
_SMI_MIG = re.compile(r"^\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: (MIG-[^)]+)\)\s*$")


def parse_nvidia_smi_list(text: str) -> list[Gpu]:
    """The devices of `nvidia-smi -L` output; a GPU that lists MIG instances is replaced by them."""
    found: list[Gpu] = []
    parent: Gpu | None = None
    for line in text.splitlines():
        if m := _SMI_GPU.match(line):
            parent = Gpu(uuid=m.group(3), index=m.group(1), name=m.group(2))
            found.append(parent)
        elif (m := _SMI_MIG.match(line)) and parent is not None:
            if found and found[-1] is parent:
                found.pop()
            found.append(Gpu(uuid=m.group(3), index=f"{parent.index}:{m.group(2)}",
                             name=f"{parent.name} MIG {m.group(1)}"))
    return found


def nvml_gpus() -> list[Gpu] | None:
    """The devices NVML (nvidia-ml-py's `pynvml`) reports, or None when NVML is not importable or has no driver. NVML
    shows what this machine or container has: inside a container given GPUs 2 and 3 of the host, two devices."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        found: list[Gpu] = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            gpu = Gpu(uuid=_text(pynvml.nvmlDeviceGetUUID(handle)), index=str(i),
                      name=_text(pynvml.nvmlDeviceGetName(handle)))
            try:
                mig = pynvml.nvmlDeviceGetMigMode(handle)[0] == pynvml.NVML_DEVICE_MIG_ENABLE
            except pynvml.NVMLError:  # NOT_SUPPORTED: a GPU without MIG
                mig = False
            if not mig:
                found.append(gpu)
                continue
            for j in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    instance = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
                except pynvml.NVMLError:  # an empty slot
                    continue
                found.append(Gpu(uuid=_text(pynvml.nvmlDeviceGetUUID(instance)), index=f"{i}:{j}",
                                 name=f"{gpu.name} MIG"))
        return found
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def enumerate_gpus() -> list[Gpu] | None:
    """This machine's devices without initialising CUDA: through NVML, else `nvidia-smi -L`; None when neither is
    available (no NVIDIA driver here, or not inside this container)."""
    if (found := nvml_gpus()) is not None:
        return found
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return parse_nvidia_smi_list(result.stdout) if result.returncode == 0 else None


def visible_pool(gpus: Sequence[Gpu] | None, visible: str | None) -> list[str]:
    """The UUIDs of the devices this process may hand out: all of `gpus`, or those `visible` (a
    CUDA_VISIBLE_DEVICES value: indices in NVML order, or UUIDs and unique UUID prefixes) names.

    UUIDs, not indices, go into the jobs' CUDA_VISIBLE_DEVICES: CUDA numbers the devices it can see from 0 (inside a
    container given a subset of the host's GPUs, under MIG, or when CUDA_VISIBLE_DEVICES is already set), so a host's
    device number can name no device, or another one. An entry that names no device raises, and so does one that
    names a device already named ("0,0"; the pool would hold the device twice and a claim of both would wait for a lock
    it holds itself). Without any enumeration (`gpus` None) the entries of `visible` are taken as they are. (CUDA uses
    one MIG instance per process: a job given two sees one, and `resolve_device` refuses it.)"""
    entries = [e.strip() for e in (visible or "").split(",") if e.strip()]
    if gpus is None:
        return _once_each(entries, entries, visible)
    if visible is None:
        return [g.uuid for g in gpus]
    listed = ", ".join(f"{g.uuid} (index {g.index}, {g.name})" for g in gpus) or "none"
    pool = []
    for entry in entries:
        if entry.isdigit():  # a GPU's index, or a GPU in MIG mode: its instances (more than one is refused)
            matches = [g for g in gpus if g.index.split(":")[0] == str(int(entry))]
        else:
            matches = [g for g in gpus if g.uuid == entry] or [g for g in gpus if g.uuid.startswith(entry)]
        if len(matches) != 1:
            raise DeviceListError(f"{VISIBLE} entry {entry!r} names {'no' if not matches else 'more than one'} "
                                  f"device of this machine: {listed}. Inside a container or with MIG, CUDA numbers "
                                  f"the visible devices from 0; name devices by UUID (nvidia-smi -L)")
        pool.append(matches[0].uuid)
    return _once_each(pool, entries, visible)


def _once_each(pool: list[str], entries: list[str], visible: str | None) -> list[str]:
    """`pool` (the devices `entries` name, in order), or DeviceListError naming the first entry whose device an earlier
    entry named."""
    for i, device in enumerate(pool):
        if device in pool[:i]:
            raise DeviceListError(f"{VISIBLE}={visible!r}: entry {entries[i]!r} names a device an earlier entry "
                                  f"({entries[pool.index(device)]!r}) names: give each device once")
    return pool


def machine_devices(env: Mapping[str, str] = os.environ, gpus: Sequence[Gpu] | None = None) -> list[str]:
    """The devices (UUIDs) this process may hand out, without initialising CUDA: those of this machine (`gpus`,
    default `enumerate_gpus()`), narrowed to `CUDA_VISIBLE_DEVICES` when it is set."""
    return visible_pool(enumerate_gpus() if gpus is None else gpus, env.get(VISIBLE))


def _try_lock(path: Path) -> IO[str] | None:
    """The locked, open lock file (its content names the holder's pid), or None when another process holds it."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


@contextlib.contextmanager
def claim_devices(count: int, devices: Sequence[str], lock_dir: Path, *, timeout: float = 3600.0,
                  poll: float = 1.0) -> Iterator[list[str]]:
    """Hold `count` of `devices` exclusively (against every other claim on the same `lock_dir`) while the block runs.

    Waits up to `timeout` seconds for enough free devices; raises DevicesBusy after that and DeviceListError at once
    when the pool is smaller than `count`. Yields the claimed ids, lowest free first."""
    if count > len(devices):
        raise DeviceListError(f"{count} GPU(s) requested but only {len(devices)} available: {list(devices)}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        held = {}
        for device in devices:
            if len(held) == count:
                break
            if (handle := _try_lock(lock_dir / f"{device.replace('/', '_')}.lock")) is not None:
                held[device] = handle
        if len(held) == count:
            break
        for handle in held.values():
            handle.close()
        if time.monotonic() >= deadline:
            raise DevicesBusy(f"{count} GPU(s) requested, fewer free among {list(devices)} for {timeout:g} s "
                              f"(locks in {lock_dir})")
        time.sleep(poll)
    try:
        yield list(held)
    finally:
        for handle in held.values():
            handle.close()


@contextlib.contextmanager
def gpu_placement(count: int | None, *, env: MutableMapping[str, str] = os.environ, lock_dir: Path | None = None,
                  devices: Sequence[str] | None = None, timeout: float = 3600.0) -> Iterator[str | None]:
    """Set `CUDA_VISIBLE_DEVICES` for a stage that Snakemake granted `count` GPUs, for the duration of the block.

    - count None (not run by the workflow, e.g. a stage run by hand): unchanged;
    - count 0: no device is visible, so a CPU job never takes a GPU that Snakemake counted as free for another job;
    - inside a SLURM job: unchanged (the scheduler placed the job);
    - otherwise: `count` devices claimed from the lock pool (`devices`, default `machine_devices()`: UUIDs), which
      CUDA then numbers cuda:0, cuda:1, ... in the order claimed.
    Yields the value set (None when unchanged). Must run before torch initialises CUDA; the previous value is restored
    on exit."""
    if count is None or ("SLURM_JOB_ID" in env and count > 0):
        yield None
        return
    previous = env.get(VISIBLE)
    with contextlib.ExitStack() as stack:
        if count == 0:
            claimed: list[str] = []
        else:
            pool = machine_devices(env) if devices is None else devices
            claimed = stack.enter_context(
                claim_devices(count, pool, lock_dir or default_lock_dir(), timeout=timeout))
            log.info("GPUs claimed: %s", ", ".join(f"{device} (cuda:{i})" for i, device in enumerate(claimed)))
        env[VISIBLE] = ",".join(claimed)
        try:
            yield env[VISIBLE]
        finally:
            if previous is None:
                env.pop(VISIBLE, None)
            else:
                env[VISIBLE] = previous


# The oldest Linux driver branch that runs a CUDA major release (NVIDIA's CUDA release notes, "minor version
# compatibility"): a torch built for CUDA 13.x needs at least a 580 driver.
MIN_DRIVER = {11: "450", 12: "525", 13: "580"}


class CudaUnavailable(DeviceError, RuntimeError):
    """GPUs were asked for, and CUDA cannot provide them."""


def driver_cuda_version() -> str | None:
    """The newest CUDA version the installed driver supports ("12.4"), through NVML or nvidia-smi; None without one."""
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            try:
                version = pynvml.nvmlSystemGetCudaDriverVersion()
            finally:
                pynvml.nvmlShutdown()
            return f"{version // 1000}.{version % 1000 // 10}"
        except pynvml.NVMLError:
            pass
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
    return m.group(1) if (m := re.search(r"CUDA Version:\s*([\d.]+)", result.stdout)) else None


def cuda_unavailable_message(gpus: int, torch_version: str, build_cuda: str | None, driver_cuda: str | None) -> str:
    """Why `gpus` GPUs cannot be used, and what to do: the torch build's CUDA version and the driver it needs."""
    if build_cuda is None:
        return (f"{gpus} GPU(s) requested, but this torch ({torch_version}) is a CPU-only build: install a CUDA build "
                f"(make install TORCH=\"torch==<version>\" EXTRAS=\"test,vllm,slurm\"), or give the stage no GPUs "
                f"(resources.<stage>.gpus: 0)")
    major = int(build_cuda.split(".")[0])
    needs = f"Linux driver {MIN_DRIVER[major]} or newer" if major in MIN_DRIVER else "a recent driver"
    found = (f"the driver here supports CUDA {driver_cuda} at most" if driver_cuda else
             "no NVIDIA driver was found (neither NVML nor nvidia-smi answers)")
    return (f"{gpus} GPU(s) requested, but CUDA is not usable: this torch ({torch_version}) is built for CUDA "
            f"{build_cuda}, which needs an NVIDIA driver that supports CUDA {build_cuda} ({needs}); {found}. Update "
            f"the driver, install a torch built for the CUDA version the driver supports, or give the stage no GPUs "
            f"(resources.<stage>.gpus: 0)")


def resolve_device(gpus: int | None):
    """The torch device a stage computes on, given the GPUs the workflow granted it (`--gpus`):

    - None (a stage run by hand without --gpus): CUDA when usable, else the CPU;
    - 0: the CPU;
    - N > 0: CUDA with at least N visible devices, else CudaUnavailable naming the torch build's CUDA version and
      the driver it needs; never a silent fallback to the CPU (which would load a 4B model there and leave the CUDA
      vLLM to fail with a platform error)."""
    import torch

    if gpus == 0:
        return torch.device("cpu")
    usable = torch.cuda.is_available()
    if gpus is None:
        return torch.device("cuda" if usable else "cpu")
    if not usable:
        raise CudaUnavailable(cuda_unavailable_message(gpus, torch.__version__, torch.version.cuda,
                                                       driver_cuda_version()))
    if (count := torch.cuda.device_count()) < gpus:
        raise CudaUnavailable(f"{gpus} GPU(s) requested, CUDA sees {count} ({VISIBLE}="
                              f"{os.environ.get(VISIBLE, '<unset>')!r}): a claimed device is not visible to CUDA")
    return torch.device("cuda")


def local_gpu_problem(needs: Mapping[str, int], granted: int | None, available: int) -> str | None:
    """Why a local run whose stages need `needs` GPUs per job (stage -> N > 0) would stall or fail, or None.

    `granted` is Snakemake's `--resources gpu=...` (None: not given, so Snakemake starts GPU jobs side by side without
    limit and each one beyond the machine's devices would wait for a device for an hour, then fail); `available` is
    the number of devices this machine shows (`machine_devices()`)."""
    if not needs:
        return None
    stage = max(needs, key=needs.get)
    if needs[stage] > available:
        return (f"a {stage} job needs {needs[stage]} GPU(s) (resources.{stage}.gpus) and this machine shows "
                f"{available} ({VISIBLE} and NVML / nvidia-smi): run on a machine with enough GPUs, through the "
                f"SLURM profile (--profile profiles/slurm), or give the stage fewer GPUs")
    if granted is None:
        return (f"this config gives jobs GPUs ({', '.join(f'resources.{s}.gpus: {n}' for s, n in needs.items())}) "
                f"but Snakemake was not told how many there are, so it would start GPU jobs side by side and those "
                f"beyond this machine's {available} GPU(s) would wait for a device, then fail: run with "
                f"--resources gpu={available}")
    if granted > available:
        return (f"--resources gpu={granted} but this machine shows {available} GPU(s): run with "
                f"--resources gpu={available}")
    return None
