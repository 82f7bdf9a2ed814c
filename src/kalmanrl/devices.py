"""GPU placement for concurrent jobs on one machine.

Snakemake counts GPUs (`resources: gpu=N` against `--resources gpu=<total>`) but never says *which* devices a job
may use, so two GPU jobs started together would both land on device 0. Each stage therefore claims its N devices from
a pool of lock files (one per device id) and exports `CUDA_VISIBLE_DEVICES` before torch initialises CUDA.

The locks are `flock`s on open files: the kernel drops them when the holding process exits, also when it is killed,
so a crashed or cancelled job never leaks a device. Under SLURM the scheduler has already placed the job (it sets
`CUDA_VISIBLE_DEVICES` from the job's allocation), so the pool is not used there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import IO

VISIBLE = "CUDA_VISIBLE_DEVICES"
LOCK_DIR_ENV = "KALMANRL_GPU_LOCK_DIR"


class DevicesBusy(TimeoutError):
    """Fewer free devices than requested for longer than the timeout."""


def default_lock_dir() -> Path:
    """One lock directory per user and machine (`$KALMANRL_GPU_LOCK_DIR` overrides it, e.g. to share between users)."""
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / f"kalmanrl-gpus-{os.getuid()}")


def machine_devices(env: Mapping[str, str] = os.environ, dev_dir: Path = Path("/dev")) -> list[str]:
    """Device ids this process may use, without initialising CUDA: the ids in `CUDA_VISIBLE_DEVICES` when it is set
    (the user narrowed the pool), else one per `/dev/nvidia<N>` node."""
    if VISIBLE in env:
        return [d for d in env[VISIBLE].split(",") if d.strip()]
    found = (m.group(1) for p in dev_dir.glob("nvidia*") if (m := re.fullmatch(r"nvidia(\d+)", p.name)))
    return sorted(found, key=int)


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

    Waits up to `timeout` seconds for enough free devices; raises DevicesBusy after that and ValueError at once when
    the pool is smaller than `count`. Yields the claimed ids, lowest free first."""
    if count > len(devices):
        raise ValueError(f"{count} GPU(s) requested but only {len(devices)} available: {list(devices)}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        held = {}
        for device in devices:
            if len(held) == count:
                break
            if (handle := _try_lock(lock_dir / f"gpu{device}.lock")) is not None:
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
    - otherwise: `count` devices claimed from the lock pool (`devices`, default `machine_devices()`).
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
        env[VISIBLE] = ",".join(claimed)
        try:
            yield env[VISIBLE]
        finally:
            if previous is None:
                env.pop(VISIBLE, None)
            else:
                env[VISIBLE] = previous
