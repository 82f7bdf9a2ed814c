"""Processes that end with the process that started them, however it ends.

A training job is a tree: Snakemake runs `kalmanrl train`, which starts torchrun (or srun), which starts the ranks,
which start reward worker processes. A SIGKILL to Snakemake's process group (an out-of-memory kill, a closed
terminal) reaches only that group, and torchrun starts every rank in a session of its own: without help the ranks
would go on training, and writing into the run directory, after their job is gone. (Under SLURM the job's cgroup is
killed whole; on a workstation nothing else would end them.)

Linux's parent-death signal closes the gap: a child asks the kernel, with `prctl(PR_SET_PDEATHSIG)`, for a signal
when its parent ends. The child sets it after the fork, so a parent that ended before that is caught by looking at
the parent afterwards. The signal follows the *thread* that forked the child; every fork it guards here is made by a
main thread (subprocess in the CLI, torchrun's agent loop).

A reward worker's parent is multiprocessing's forkserver, which outlives the pool's process as long as a worker does
(each worker holds the forkserver's keep-alive pipe): a worker busy with an item would keep both alive. So a worker
watches the pool's process itself instead (`end_with`, a pidfd)."""

from __future__ import annotations

import ctypes
import functools
import os
import select
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun's agent in every process it starts
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here, not in a freshly forked child


class ParentEnded(SystemExit):
    """The process this one should end with (its parent) ended before this one could follow it."""


def end_with_parent(sig: int = signal.SIGKILL, *, parent: int | None = None) -> None:
    """Have the kernel send `sig` to this process when its parent ends. `parent`: the pid the parent had when it
    started this process; when that is no longer the parent, the parent has already ended: exit at once."""
    if _LIBC.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    if parent is not None and os.getppid() != parent:
        raise ParentEnded(f"process {os.getpid()}: its parent {parent} ended before it could follow it; exiting")


def ending_with_this_process(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` for `subprocess`: the child gets `sig` when this process ends. SIGTERM lets torchrun and srun
    stop their own ranks and job steps before they exit."""
    return functools.partial(_end_with_parent_in_child, int(sig), os.getpid())


def _end_with_parent_in_child(sig: int, parent: int) -> None:
    """`end_with_parent` between fork and exec, where an exception would only say that preexec_fn failed."""
    try:
        end_with_parent(sig, parent=parent)
    except ParentEnded as ended:
        os.write(2, f"{ended}\n".encode())
        os._exit(1)


def end_with(pid: int) -> None:
    """SIGKILL this process when process `pid` (any process, not only the parent) ends: a daemon thread waits on a
    pidfd of it. Exit at once when it has already ended."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        raise ParentEnded(f"process {os.getpid()}: process {pid}, which it ends with, has already ended; exiting"
                          ) from None

    def watch() -> None:
        select.select([handle], [], [])  # readable once the process has ended
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name=f"end-with-{pid}", daemon=True).start()


def end_with_torchrun(env: Mapping[str, str] = os.environ) -> None:
    """In a process torchrun started (a rank): SIGKILL when torchrun ends, and exit at once when torchrun has already
    ended (the parent is then no torchrun). A no-op in any other process."""
    if TORCHRUN_ENV not in env:
        return
    end_with_parent(signal.SIGKILL)
    if not is_torchrun(os.getppid()):
        raise ParentEnded(f"rank process {os.getpid()}: the torchrun that started it has ended; exiting")


def is_torchrun(pid: int) -> bool:
    """Whether process `pid` runs torchrun (the console script or `python -m torch.distributed.run`)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(os.fsdecode(arg)).name == "torchrun" or arg == b"torch.distributed.run" for arg in argv)
