"""A pool of persistent worker processes that run one function on many items, each item under hard limits.

Rewards use it to judge completions they cannot settle with linear-time string work: a completion must never hang,
exhaust the memory of, or crash the training job. Each item gets `timeout_s` of wall time (past it its worker is
killed and replaced) in a process whose address space is capped at `max_memory_mb`.

Two kinds of failure are kept apart, because only one of them is a verdict:
- an item that hits a limit (time, memory, recursion depth, or its worker dying on it) gives a `LimitHit`, which the
  reward scores 0 and counts;
- a pool that cannot work at all raises: a worker that does not start (`WorkerStartError`, e.g. the main module
  cannot be re-imported by a fresh process) or a check that raises an unexpected exception (`CheckError`). Scoring
  those as 0 would turn a broken setup into a plausible-looking, wrong training signal.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import resource
import signal
import sys
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler

from kalmanrl.runtime.lifetime import end_with

__all__ = ["LimitHit", "WorkerPool", "WorkerStartError", "CheckError"]

_READY = "ready"


class WorkerStartError(RuntimeError):
    """A worker process exited, or stayed silent, before it was ready to take items."""


class CheckError(RuntimeError):
    """The checked function raised an exception that is not a resource limit (a bug, a missing package)."""


@dataclass(frozen=True)
class LimitHit:
    """The result of an item that hit a limit: `limit` is "time", "memory", "recursion" or "crash" (its worker
    process died on it, e.g. killed by the address-space limit inside native code)."""

    limit: str


class WorkerPool:
    """`num_workers` processes that run `check(*args)` for a list of items. Items go out in chunks and results
    come back one by one; a worker that takes longer than `timeout_s` on one item (or dies) is killed and replaced,
    that item's result is a `LimitHit` and the rest of its chunk is handed out again. So a batch of N items takes at
    most about N * timeout_s / num_workers, whatever the items hold.

    `preload`: modules the forkserver imports once, so forked workers start with them loaded (e.g. sympy).
    `warmup`: arguments of one check each worker runs before it reports ready, so lazy initialisation (a parser's
    grammar, caches) is not charged to the first real item's time limit; its failure is a `WorkerStartError`.
    `start_timeout_s`: how long a fresh worker may take to report ready before the pool gives up and raises.
    """

    def __init__(self, check: Callable, num_workers: int, timeout_s: float, max_memory_mb: int,
                 preload: Iterable[str] = (), warmup: tuple | None = None, start_timeout_s: float = 120.0):
        self.check, self.num_workers, self.timeout_s, self.max_memory_mb = check, num_workers, timeout_s, max_memory_mb
        module = getattr(check, "__module__", None)
        self.preload = [*([module] if module else []), *preload]
        self.warmup, self.start_timeout_s = warmup, start_timeout_s
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)

    def run(self, items: list[tuple]) -> list[object]:
        """Results in the order of `items`; a `LimitHit` where the check hit a limit. Raises `WorkerStartError` when
        a worker cannot start and `CheckError` when the check raises something other than a limit."""
        self._workers[:] = [w if w.process.is_alive() else self._restart(w) for w in self._workers]
        self._workers.extend(self._start() for _ in range(self.num_workers - len(self._workers)))
        results: list[object] = [None] * len(items)
        queue = deque(range(len(items)))
        chunk = max(1, min(32, math.ceil(len(items) / (4 * self.num_workers))))
        for worker in self._workers:
            self._assign(worker, queue, items, chunk)
        try:
            while busy := [w for w in self._workers if w.inflight]:
                timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic())
                ready = set(wait([w.conn for w in busy], timeout))
                now = time.monotonic()
                for worker in busy:
                    if worker.conn in ready:
                        try:
                            message = worker.conn.recv()
                        except (EOFError, OSError):  # the worker died: its current item failed
                            if not worker.ready:
                                raise self._start_error(worker) from None
                            results[worker.inflight[0]] = LimitHit("crash")
                            worker = self._replace(worker, queue)
                        else:
                            kind, value = message
                            if kind == _READY:
                                worker.ready, worker.deadline = True, now + self.timeout_s
                                continue
                            if kind == "start_error":
                                raise self._start_error(worker, f"failed its warm-up check:\n{value}")
                            index = worker.inflight.popleft()
                            if kind == "error":
                                raise CheckError(f"{_name(self.check)}{_short(items[index])} raised in a worker "
                                                 f"process:\n{value}")
                            results[index] = value if kind == "ok" else LimitHit(value)
                            worker.deadline = now + self.timeout_s
                    elif now >= worker.deadline:
                        if not worker.ready:
                            raise self._start_error(worker, f"did not report ready within {self.start_timeout_s:g} s")
                        results[worker.inflight[0]] = LimitHit("time")
                        worker = self._replace(worker, queue)
                    else:
                        continue
                    if not worker.inflight:
                        self._assign(worker, queue, items, chunk)
        except BaseException:
            # A call that ends early (CheckError, WorkerStartError, Ctrl-C) leaves chunks in flight, whose results the
            # next call would read as its own: the workers still holding items go, and the next call starts fresh ones.
            for worker in [w for w in self._workers if w.inflight]:
                worker.stop(kill=True)
            self._workers[:] = [w for w in self._workers if not w.inflight]
            raise
        return results

    def close(self) -> None:
        _stop_all(self._workers)

    def _context(self) -> mp.context.BaseContext:
        return mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")

    def _start(self) -> _Worker:
        ctx = self._context()
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload(self.preload)  # forked workers start with these loaded
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(child, self.check, self.max_memory_mb, self.warmup, os.getpid()),
                              daemon=True, name="kalmanrl-worker")
        process.start()
        child.close()
        return _Worker(process, parent, time.monotonic() + self.start_timeout_s)

    def _start_error(self, worker: _Worker, what: str | None = None) -> WorkerStartError:
        """Why `worker` never became ready, with the likely cause when it is one we can see from here."""
        worker.stop(kill=True)
        what = what or f"exited with code {worker.process.exitcode} before it was ready"
        method = self._context().get_start_method()
        message = (f"{_name(self.check)}: a worker process {what} (start method {method}); the reward cannot judge "
                   f"anything, so it stops here instead of scoring every completion 0. The worker's own traceback, "
                   f"if any, is above on standard error.")
        main = sys.modules.get("__main__")
        path = getattr(main, "__file__", None)
        if getattr(main, "__spec__", None) is None and path is not None and not os.path.exists(path):
            message += (f" Likely cause: a fresh {method} process re-imports the main module from {path!r}, which "
                        f"is not a file (a script read on standard input, `python - < script.py`): run the script "
                        f"as a file (`python script.py`) or as a module (`python -m ...`).")
        return WorkerStartError(message)

    def _assign(self, worker: _Worker, queue: deque, items: list[tuple], chunk: int) -> None:
        if not queue:
            return
        worker.inflight.extend(queue.popleft() for _ in range(min(chunk, len(queue))))
        try:
            worker.conn.send([items[i] for i in worker.inflight])
        except OSError:  # the worker is gone; `run` sees the closed pipe and replaces it
            pass
        if worker.ready:
            worker.deadline = time.monotonic() + self.timeout_s

    def _replace(self, worker: _Worker, queue: deque) -> _Worker:
        """Kill `worker` (its current item's result is already set), requeue the rest of its chunk, start a fresh
        worker."""
        worker.inflight.popleft()
        queue.extendleft(reversed(worker.inflight))
        fresh = self._restart(worker)
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def _restart(self, worker: _Worker) -> _Worker:
        worker.stop(kill=True)
        return self._start()


class _Worker:
    def __init__(self, process: mp.Process, conn: Connection, start_deadline: float):
        self.process, self.conn, self.inflight = process, conn, deque()
        self.ready, self.deadline = False, start_deadline

    def stop(self, kill: bool = False) -> None:
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(1.0)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop()
    workers.clear()


def _name(check: Callable) -> str:
    return f"{getattr(check, '__module__', '')}.{getattr(check, '__qualname__', repr(check))}".lstrip(".")


def _short(args: tuple, limit: int = 200) -> str:
    text = repr(args)
    return text if len(text) <= limit else f"{text[:limit]}...)"


def _serve(conn: Connection, check: Callable, max_memory_mb: int, warmup: tuple | None, owner: int) -> None:
    """Worker loop: run the warm-up check and report ("ready", None) (or ("start_error", traceback)), then for each
    chunk send one (kind, value) per item: ("ok", result), ("limit", "memory" | "recursion") or ("error",
    traceback); exit on None, and at once (SIGKILL), even in the middle of an item, when the pool's process `owner`
    ends (`kalmanrl.runtime.lifetime.end_with`)."""
    end_with(owner)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    limit = max_memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": the pool enforces it
    if warmup is not None:
        try:
            check(*warmup)
        except Exception:
            conn.send(("start_error", traceback.format_exc()))
            return
    conn.send((_READY, None))
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        for args in chunk:
            try:
                message = ("ok", check(*args))
            except MemoryError:
                message = ("limit", "memory")
            except RecursionError:
                message = ("limit", "recursion")
            except Exception:
                message = ("error", traceback.format_exc())
            conn.send_bytes(_pickled(message))


def _pickled(message: tuple) -> bytes:
    """`message` as `Connection.send` pickles it; a result that cannot be pickled is the check's error (sending it
    would kill the worker, and the item would pass for a "crash" limit hit), a pickle too large or too deep a limit."""
    try:
        return ForkingPickler.dumps(message)
    except MemoryError:
        return ForkingPickler.dumps(("limit", "memory"))
    except RecursionError:
        return ForkingPickler.dumps(("limit", "recursion"))
    except Exception:
        return ForkingPickler.dumps(("error", f"its result could not be sent back to the pool (pickled):\n"
                                              f"{traceback.format_exc()}"))
