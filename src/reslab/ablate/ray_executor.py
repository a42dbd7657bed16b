"""Spread an ablation grid over a Ray cluster: every grid point is one Ray task (optional extra `reslab[ray]`).

    reslab ablate --executor ray                          # a local Ray instance, or the cluster in RAY_ADDRESS
    reslab ablate --executor ray --ray-address HOST:6379 --ray-cpus 4 --ray-gpus 1

A task trains its point exactly as the local executors do (`reslab.ablate.point.run_point`), with as many torch
threads as CPUs it reserved. Where the task sees the ablation directory (the same machine, or a filesystem shared
by the cluster) it writes its run directory in place, checkpoints included, so an interrupted grid resumes; elsewhere
it trains in a scratch directory and sends the finished run directory back to the driver, which writes it. Either
way the driver ends with the same ablation directory, and the same summary, as a local run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reslab.ablate.point import GridJob, GridPoint, point_status, run_point
from reslab.errors import ReslabError
from reslab.io import atomic_write


def require_ray():
    """The `ray` module, or the one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ReslabError('--executor ray needs Ray, which is not installed: pip install "reslab[ray]"') from None
    return ray


@dataclass(frozen=True)
class RayExecutor:
    """One Ray task per grid point, each reserving `cpus` CPUs (its torch threads) and `gpus` GPUs.

    Joins the Ray runtime already running in this process, else `ray.init(address)`: with no address Ray connects to
    RAY_ADDRESS or a cluster started on this machine (`ray start --head`), or else starts a local instance.
    """

    address: str | None = None
    cpus: float = 1.0
    gpus: float = 0.0

    def describe(self) -> str:
        return "as Ray tasks"

    def run(self, points: list[GridPoint], job: GridJob) -> Iterator[tuple[GridPoint, dict[str, Any]]]:
        """Submit one task per point; yield (point, summary) as tasks finish, their run directories in place."""
        ray = require_ray()
        if not points:
            return  # nothing to train: no need for a Ray runtime
        started_here = not ray.is_initialized()
        if started_here:
            try:
                ray.init(address=self.address, log_to_driver=False)
            except ConnectionError as error:
                raise ReslabError(f"cannot connect to the Ray cluster at {self.address}: {error}") from None
        pending: dict = {}
        try:
            self._submit(ray, points, job, pending)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                point = pending.pop(done[0])
                result = _result(ray, done[0], point)
                if result["files"] is not None:
                    _write_run_dir(job.run_dir(point), result["files"])
                yield point, result["summary"]
        finally:
            for ref in pending:  # stopped early (an error, Ctrl-C): no task keeps writing into the directory
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()

    def _submit(self, ray, points: list[GridPoint], job: GridJob, pending: dict) -> None:
        """One task per point, each added to `pending` (ref -> point) as soon as it is submitted."""
        task = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(_train_point)
        for point in points:
            run_dir = job.run_dir(point)
            # A stopped point's files travel with its task, for a node that cannot see this directory.
            files = _read_run_dir(run_dir) if point_status(run_dir, job.steps) == "partial" else None
            ref = task.remote(point, job.model, job.model_overrides, job.train_overrides, str(run_dir.resolve()),
                              max(1, int(self.cpus)), job.started, files)
            pending[ref] = point


def _result(ray, ref, point: GridPoint) -> dict[str, Any]:
    """A finished task's result; a user error or a dead worker as one line naming the grid point."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, ReslabError):
            raise ReslabError(f"grid point {point.name}: {error.cause}") from None
        raise
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as error:
        raise ReslabError(f"grid point {point.name}: its Ray worker died ({type(error).__name__}); run the "
                          "same command again to resume the grid") from None


def _train_point(point: GridPoint, model: str, model_overrides: dict[str, Any], train_overrides: dict[str, Any],
                 run_dir: str, threads: int, started: float, files: dict[str, bytes] | None) -> dict[str, Any]:
    """The Ray task: train one point in place if this node sees the driver's ablation directory, else in scratch.
    Its arguments are plain values, the `GridJob` taken apart, as they cross to another machine."""
    run_path = Path(run_dir)
    job = GridJob(model, model_overrides, train_overrides, run_path.parent.parent, started)
    if job.is_driver_dir():  # not a namesake on another machine
        return {"summary": run_point(point, job, run_path, threads), "files": None}
    with tempfile.TemporaryDirectory(prefix="reslab-ray-") as scratch:
        local = Path(scratch) / run_path.name
        if files:
            _write_run_dir(local, files)
        summary = run_point(point, job, local, threads)
        return {"summary": summary, "files": _read_run_dir(local)}


def _read_run_dir(run_dir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(run_dir)): path.read_bytes() for path in sorted(run_dir.rglob("*")) if path.is_file()}


def _write_run_dir(run_dir: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        atomic_write(run_dir / name, data)
