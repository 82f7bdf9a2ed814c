"""One writer per run directory.

Two training jobs writing into one run directory race (a checkpoint renamed half-way, two `final/` directories,
metrics from one and weights from the other), and with different settings they would not even compute the same
thing. So a training job holds the run directory's writer lock (`layout.RUN_LOCK`) for its whole life: `kalmanrl
train` takes it before it reads a checkpoint, and the torchrun or srun it starts inherits it, so that the lock lasts
as long as any rank can write. A second job on the same directory waits a little (a killed job's processes take a
moment to go), then stops with a message naming the holder's pid and host.

The lock is an `flock` on the open file, as the GPU claims of `kalmanrl.runtime.devices` are: the kernel drops it when
the last process holding the file ends, also when it is killed, so a dead job never blocks the next one. Its text names
the holder; a file that names someone but is not locked is a dead job's (stale) and is taken over. The file is never
deleted (a process waiting on a deleted file would lock a file no one else sees)."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from kalmanrl.core.layout import run_lock_file

log = logging.getLogger(__name__)


class RunDirectoryBusy(RuntimeError):
    """Another job holds the run directory's writer lock."""


@contextlib.contextmanager
def run_writer(run_dir: str | Path, *, timeout: float = 10.0, poll: float = 0.2) -> Iterator[IO[str]]:
    """Hold `run_dir`'s writer lock while the block runs, waiting up to `timeout` seconds for a holder to end; raises
    RunDirectoryBusy naming the holder after that. Yields the open lock file: a child process given its descriptor
    (`pass_fds`) holds the lock too, until it ends."""
    path = run_lock_file(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _holder(handle)
                handle.close()
                raise RunDirectoryBusy(
                    f"{run_dir} is being written by another training job ({holder}; lock file {path}): let it "
                    f"finish or stop it; a second job on the same run directory would mix their checkpoints and "
                    f"results") from None
            time.sleep(poll)
    stale = _holder(handle)
    if stale:
        log.warning("%s: taking over the writer lock of %s, which ended without releasing it", run_dir, stale)
    _write(handle, {"pid": os.getpid(), "host": socket.gethostname(),
                    "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")})
    try:
        yield handle
    finally:
        _write(handle, None)  # an empty file: released, not stale
        handle.close()


def _holder(handle: IO[str]) -> str:
    """Who the lock file names ("pid 123 on host node01 since ..."), or "" when it names no one."""
    handle.seek(0)
    text = handle.read().strip()
    if not text:
        return ""
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']} since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return f"a holder the lock file describes as {text[:200]!r}"


def _write(handle: IO[str], holder: dict | None) -> None:
    handle.seek(0)
    handle.truncate()
    if holder is not None:
        handle.write(json.dumps(holder) + "\n")
    handle.flush()
