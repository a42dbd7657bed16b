"""Who trains an ablation's grid points: this process, a pool of local processes, or a Ray cluster.

Every executor has one interface: `run(points, job)` trains each point (`reslab.ablate.point.run_point`) and yields
(point, summary) as each finishes, in any order; `describe()` says how, for the ablation's first line. The grid
(`reslab.ablate.grid`) takes an executor object; only the command line picks one by name.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from reslab.ablate.point import GridJob, GridPoint, run_point
from reslab.ablate.ray_executor import RayExecutor
from reslab.heap import tune_malloc
from reslab.processes import die_with_parent

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


def start_worker(parent: int) -> None:
    """A pool worker's initializer: exit with the ablation, and keep freed memory for the next step."""
    die_with_parent(parent)
    tune_malloc()


__all__ = ["Executor", "InlineExecutor", "ProcessExecutor", "RayExecutor", "local_executor"]
