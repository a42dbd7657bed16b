"""Who trains an ablation's grid points: this process, a pool of local processes, or a Ray cluster.

Every executor has one interface: `run(points, job)` trains each point (`reslab.ablate.point.run_point`) and yields
(point, summary) as each finishes, in any order; `describe()` says how, for the ablation's first line. The grid
(`reslab.ablate.grid`) takes an executor object; only the command line picks one by name.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from reslab.ablate.point import GridJob, GridPoint, run_point
from reslab.ablate.ray_executor import RayExecutor

Results = Iterator[tuple[GridPoint, dict[str, Any]]]


class Executor(Protocol):
    def describe(self) -> str:
        """How the points are trained, e.g. "with 2 job(s) x 1 thread(s)"."""

    def run(self, points: list[GridPoint], job: GridJob) -> Results:
        """Train `points`; yield (point, summary) as each finishes."""


@dataclass(frozen=True)
class InlineExecutor:
    """One point after another in this process, with torch's threads as configured."""

    def describe(self) -> str:
        return f"with 1 job(s) x {threads_per_job(1)} thread(s)"

    def run(self, points: list[GridPoint], job: GridJob) -> Results:
        for point in points:
            yield point, run_point(point, job)


@dataclass(frozen=True)
class ProcessExecutor:
    """`jobs` points at a time in spawned worker processes, cores shared among them, each ending with this one."""

    jobs: int

    def describe(self) -> str:
        return f"with {self.jobs} job(s) x {threads_per_job(self.jobs)} thread(s)"

    def run(self, points: list[GridPoint], job: GridJob) -> Results:
        threads = threads_per_job(self.jobs)
        context = multiprocessing.get_context("spawn")  # fork + OpenMP threads can deadlock
        pool = futures.ProcessPoolExecutor(max_workers=self.jobs, mp_context=context, initializer=start_worker,
                                           initargs=(os.getpid(),))
        try:
            pending = {pool.submit(run_point, point, job, None, threads): point for point in points}
            for done in futures.as_completed(pending):
                yield pending[done], done.result()
        finally:  # on Ctrl-C or a failed point: points not yet started never start; running ones finish stopping
            pool.shutdown(wait=True, cancel_futures=True)


def local_executor(jobs: int) -> InlineExecutor | ProcessExecutor:
    """This process for one job, else a pool of `jobs` processes."""
    return InlineExecutor() if jobs <= 1 else ProcessExecutor(jobs)


def threads_per_job(jobs: int) -> int:
    """Threads for each of `jobs` worker processes, so that together they do not oversubscribe the cores
    (oversubscribed OpenMP threads spin against each other and can run many times slower)."""
    if jobs <= 1:
        import torch

        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 1) // jobs)


# glibc mallopt parameters, and the values a worker sets: freed memory stays in the process's heap for the next step
# instead of going back to the kernel, so a step's temporaries do not fault in fresh zeroed pages every time.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
WORKER_MALLOC = {M_MMAP_THRESHOLD: 256 << 20, M_TRIM_THRESHOLD: 256 << 20, M_TOP_PAD: 64 << 20}


def start_worker(parent: int) -> None:
    """A pool worker's initializer: exit with the ablation, and keep freed memory for the next step."""
    die_with_parent(parent)
    tune_malloc()


def tune_malloc() -> bool:
    """Keep up to 256 MiB of freed heap in this process (glibc; elsewhere nothing changes). Returns whether it did.

    With glibc's defaults a training step's short-lived buffers (bf16 autocast's weight and activation copies above
    all) are returned to the kernel and faulted back in, zeroed, on the next step: with `tiny` under bf16 that cost
    about 15% of the step in the ablation's workers (BENCHMARKS.md, "Ablation parallelism"). Only processes the
    ablation owns are tuned, never the caller's. Explicit MALLOC_*_ environment settings win."""
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(param, value) == 1 for param, value in WORKER_MALLOC.items())
    except (OSError, AttributeError):
        return False


def die_with_parent(parent: int) -> None:
    """In a worker process: exit when the ablation that started it dies (even by kill -9), instead of training on
    and idling. Linux tells the worker at once (PR_SET_PDEATHSIG); elsewhere a thread notices within a second."""
    import signal
    import threading

    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


__all__ = ["Executor", "InlineExecutor", "ProcessExecutor", "RayExecutor", "local_executor"]
