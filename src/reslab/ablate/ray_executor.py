"""Spread an ablation grid over a Ray cluster: every grid point is one Ray task (optional extra `reslab[ray]`).

    reslab ablate --executor ray                          # a local Ray instance, or the cluster in RAY_ADDRESS
    reslab ablate --executor ray --ray-address HOST:6379 --ray-cpus 4 --ray-gpus 1

A task trains its point exactly as the local executor does (`reslab.ablate.grid._run_point`), with as many torch
threads as CPUs it reserved. Where the task sees the ablation directory (the same machine, or a filesystem shared
by the cluster) it writes its run directory in place, checkpoints included, so an interrupted grid resumes; elsewhere
it trains in a scratch directory and sends the finished run directory back to the driver, which writes it. Either
way the driver ends with the same ablation directory, and the same summary, as a local run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reslab.errors import ReslabError
from reslab.io import atomic_write, read_json


def require_ray():
    """The `ray` module, or the one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ReslabError('--executor ray needs Ray, which is not installed: pip install "reslab[ray]"') from None
    return ray


def run_on_ray(points: list, model: str, model_overrides: dict[str, Any], train_overrides: dict[str, Any],
               out_dir: Path, started: float, address: str | None = None, cpus: float = 1.0,
               gpus: float = 0.0) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Submit one task per grid point; yield (point, summary) as tasks finish, their run directories in place.

    Joins the Ray runtime already running in this process, else `ray.init(address)`: with no address Ray connects to
    RAY_ADDRESS or a cluster started on this machine (`ray start --head`), or else starts a local instance.
    """
    from reslab.ablate.grid import point_status

    ray = require_ray()
    if not points:
        return  # nothing to train: no need for a Ray runtime
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as error:
            raise ReslabError(f"cannot connect to the Ray cluster at {address}: {error}") from None
    pending = {}
    try:
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_train_point)
        threads = max(1, int(cpus))
        for point in points:
            run_dir = Path(out_dir) / "runs" / point.name
            # A stopped point's files travel with its task, for a node that cannot see this directory.
            files = _read_run_dir(run_dir) if point_status(run_dir, train_overrides["steps"]) == "partial" else None
            ref = task.remote(point, model, model_overrides, train_overrides, str(run_dir.resolve()), threads,
                              started, files)
            pending[ref] = point
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            point = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayTaskError as error:
                if isinstance(error.cause, ReslabError):
                    raise ReslabError(f"grid point {point.name}: {error.cause}") from None
                raise
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as error:
                raise ReslabError(f"grid point {point.name}: its Ray worker died ({type(error).__name__}); run the "
                                  "same command again to resume the grid") from None
            if result["files"] is not None:
                _write_run_dir(Path(out_dir) / "runs" / point.name, result["files"])
            yield point, result["summary"]
    finally:
        for ref in pending:  # stopped early (an error, Ctrl-C): no task keeps writing into the directory
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


def _train_point(point, model: str, model_overrides: dict[str, Any], train_overrides: dict[str, Any], run_dir: str,
                 threads: int, started: float, files: dict[str, bytes] | None) -> dict[str, Any]:
    """The Ray task: train one point in place if this node sees the driver's ablation directory, else in scratch."""
    from reslab.ablate.grid import ABLATION, _run_point

    run_path = Path(run_dir)
    ablation = run_path.parent.parent / ABLATION
    if ablation.exists() and read_json(ablation).get("started") == started:  # the driver's directory, not a namesake
        return {"summary": _run_point(point, model, model_overrides, train_overrides, run_dir, threads), "files": None}
    with tempfile.TemporaryDirectory(prefix="reslab-ray-") as scratch:
        local = Path(scratch) / run_path.name
        if files:
            _write_run_dir(local, files)
        summary = _run_point(point, model, model_overrides, train_overrides, str(local), threads)
        return {"summary": summary, "files": _read_run_dir(local)}


def _read_run_dir(run_dir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(run_dir)): path.read_bytes() for path in sorted(run_dir.rglob("*")) if path.is_file()}


def _write_run_dir(run_dir: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        atomic_write(run_dir / name, data)
