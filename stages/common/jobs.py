"""Run independent calls a few at a time in spawned processes, splitting this process's
torch threads between them.

It pays where one call leaves cores idle (small convolutions on many cores) and costs
where torch already uses every core well, plus a few seconds per process to start
(``benchmarks/bench_jobs.py`` measures both settings side by side). Spawned, not forked:
a forked child of a process that has used torch's thread pool or CUDA can hang. Each call
and its arguments must pickle; what a call prints goes to the same stderr, so callers turn
their own progress bars off in jobs and report from here. On Linux a worker ends with the
process that started it, however that ends (SIGTERM, SIGKILL, a crash), instead of
training on unseen; its run keeps the last finished epoch's checkpoint to resume from.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Callable, Sequence


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM when our parent ends; Linux only, elsewhere a no-op."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it ended before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _start(threads: int, parent: int) -> None:
    import torch

    _die_with_parent(parent)
    torch.set_num_threads(threads)


def job_threads(jobs: int) -> int:
    """Torch threads per job: this process's count divided by ``jobs``, at least one."""
    import torch

    return max(1, torch.get_num_threads() // jobs)


def run_jobs(fn: Callable[..., Any], calls: Sequence[tuple], jobs: int,
             started: Callable[[int], None] = lambda k: None,
             finished: Callable[[int, Any], None] = lambda k, result: None) -> None:
    """``fn(*calls[k])`` for every k, at most ``jobs`` at once, in the order given.

    ``started(k)`` is called when call k is handed to a process, ``finished(k, result)``
    when it returns. The first exception stops handing out calls; it is raised once the
    running ones have ended (each keeps what it wrote, e.g. a checkpoint to resume from)."""
    if not calls:
        return
    n = min(jobs, len(calls))
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start, initargs=(job_threads(jobs), os.getpid()))
    running: dict[Future, int] = {}
    queue = iter(range(len(calls)))
    try:
        for k in queue:
            running[pool.submit(fn, *calls[k])] = k
            started(k)
            if len(running) == n:
                break
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                finished(running.pop(fut), fut.result())
                k = next(queue, None)
                if k is not None:
                    running[pool.submit(fn, *calls[k])] = k
                    started(k)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
