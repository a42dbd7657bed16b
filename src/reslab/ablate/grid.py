"""Run an ablation grid: one run directory per (scheme, depth, seed), finished points skipped, stopped ones resumed.

Layout of an ablation directory:
    ablation.json                 the command, the grid, the model and training config
    runs/<scheme>-L<depth>-s<seed>/   one run directory per grid point (see reslab.train.loop)
    summary.json, summary.csv     mean and spread over seeds per (scheme, depth)
    plots/*.png, report.html      written by reslab.report
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reslab.errors import ReslabError
from reslab.io import read_json, write_json
from reslab.rundir import LOCK, RunDir

ABLATION = "ablation.json"
DIVERGED = "diverged.json"  # written in a run directory whose loss became NaN/inf


@dataclass(frozen=True)
class GridPoint:
    residual: str
    layers: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.residual}-L{self.layers}-s{self.seed}"


def grid_points(residuals: list[str], layers: list[int], seeds: list[int]) -> list[GridPoint]:
    return [GridPoint(r, n, s) for n in layers for r in residuals for s in seeds]


def point_status(run_dir: Path, steps: int) -> str:
    """'done' (summary written for these steps), 'partial' (a checkpoint to resume) or 'new'."""
    summary = run_dir / "summary.json"
    if summary.exists() and read_json(summary).get("steps") == steps:
        return "done"
    if (run_dir / DIVERGED).exists() and read_json(run_dir / DIVERGED).get("steps") == steps:
        return "diverged"
    if (run_dir / "checkpoint.safetensors").exists() and (run_dir / "config.json").exists():
        return "partial"
    return "new"


def threads_per_job(jobs: int) -> int:
    """Threads for each of `jobs` worker processes, so that together they do not oversubscribe the cores
    (oversubscribed OpenMP threads spin against each other and can run many times slower)."""
    if jobs <= 1:
        return torch_threads()
    return max(1, (os.cpu_count() or 1) // jobs)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _run_point(point: GridPoint, model: str, model_overrides: dict[str, Any], train_overrides: dict[str, Any],
               run_dir: str, threads: int | None) -> dict[str, Any]:
    """Train one grid point: in a worker process with `threads` threads, or inline (threads None: as configured)."""
    import torch

    from reslab.train.loop import NonFiniteLoss, prepare, train

    if threads is not None:
        torch.set_num_threads(threads)
    run_path = Path(run_dir)
    status = point_status(run_path, train_overrides["steps"])
    if status == "done":
        return read_json(run_path / "summary.json")
    if status == "diverged":
        return {"diverged": read_json(run_path / DIVERGED)["message"]}
    config = {**train_overrides, "model": model, "seed": point.seed, "progress": False}
    overrides = {**model_overrides, "residual": point.residual, "layers": point.layers}
    if status == "partial":
        runtime = {"progress": False, "steps": config["steps"], "stop_at": config.get("stop_at")}
        setup = prepare({k: v for k, v in runtime.items() if v is not None}, {}, run_path, resume=True)
    else:
        setup = prepare(config, overrides, run_path, overwrite=run_path.exists())
    try:
        return train(setup)
    except NonFiniteLoss as error:  # a diverged run is a result of the experiment, not a crash of the grid
        write_json(run_path / DIVERGED, {"message": str(error), "steps": train_overrides["steps"]})
        return {"diverged": str(error)}


def run_ablation(out_dir: Path, model: str, residuals: list[str], layers: list[int], seeds: list[int],
                 model_overrides: dict[str, Any], train_overrides: dict[str, Any], jobs: int = 1,
                 command: list[str] | None = None, console=None, executor: str = "local",
                 ray_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train every grid point not yet finished, then write summary.json / summary.csv. Returns the summary.

    `executor="ray"` runs each point as a Ray task (`reslab.ablate.ray_executor`; `ray_options`: address, cpus,
    gpus per task) instead of in `jobs` local processes.
    """
    from reslab.models import make_config
    from reslab.train.config import TrainConfig

    out_dir = Path(out_dir)
    points = grid_points(residuals, layers, seeds)
    # Validate every grid point's config up front: a typo must not surface after an hour of training.
    for point in points:
        make_config(model, **{**model_overrides, "residual": point.residual, "layers": point.layers})
    train_config = TrainConfig.from_dict({**train_overrides, "model": model})
    train_record = {k: v for k, v in train_config.to_dict().items() if k != "seed"}  # seeds are in the grid
    record = {"command": command or [], "model": model, "grid": {"residual": residuals, "layers": layers,
              "seeds": seeds}, "model_overrides": model_overrides, "train": train_record}
    _check_ablation_dir(out_dir, record)
    with RunDir(out_dir).locked("reslab ablate"):  # one ablation per directory at a time
        return _run_grid(out_dir, points, record, model, model_overrides, {**train_overrides,
                         "steps": train_config.steps}, jobs, console, executor, ray_options)


def _run_grid(out_dir: Path, points: list[GridPoint], record: dict[str, Any], model: str,
              model_overrides: dict[str, Any], train_overrides: dict[str, Any], jobs: int, console, executor: str,
              ray_options: dict[str, Any] | None) -> dict[str, Any]:
    from reslab.ablate.summary import summarize

    steps = train_overrides["steps"]
    started = time.time()
    write_json(out_dir / ABLATION, {**record, "started": started, "finished": None})

    todo = [p for p in points if point_status(out_dir / "runs" / p.name, steps) not in ("done", "diverged")]
    how = "as Ray tasks" if executor == "ray" else f"with {jobs} job(s) x {threads_per_job(jobs)} thread(s)"
    _say(console, f"ablation {out_dir}: {len(points)} grid points, {len(points) - len(todo)} already done, "
                  f"{len(todo)} to train {how}")
    args = lambda p: (p, model, model_overrides, train_overrides, str(out_dir / "runs" / p.name),  # noqa: E731
                      threads_per_job(jobs) if jobs > 1 else None)
    if executor == "ray":
        from reslab.ablate.ray_executor import run_on_ray

        for point, result in run_on_ray(todo, model, model_overrides, train_overrides, out_dir, started,
                                        **(ray_options or {})):
            _report_point(console, point, result)
    elif jobs <= 1:
        for point in todo:
            _report_point(console, point, _run_point(*args(point)))
    else:
        context = multiprocessing.get_context("spawn")  # fork + OpenMP threads can deadlock
        with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=die_with_parent,
                                         initargs=(os.getpid(),)) as pool:
            pending = {pool.submit(_run_point, *args(p)): p for p in todo}
            for done in futures.as_completed(pending):
                _report_point(console, pending[done], done.result())
    summary = summarize(out_dir)
    write_json(out_dir / ABLATION, {**record, "started": started, "finished": time.time(),
                                    "wall_seconds": time.time() - started})
    return summary


def _check_ablation_dir(out_dir: Path, record: dict[str, Any]) -> None:
    """Re-running into the same directory continues it; a different experiment must not mix into it."""
    path = out_dir / ABLATION
    if not path.exists():
        if out_dir.exists() and any(p.name != LOCK for p in out_dir.iterdir()):
            raise ReslabError(f"{out_dir} is not empty and is not an ablation directory; choose another --out")
        return
    saved = read_json(path)
    from reslab.train.config import TrainConfig

    saved["train"] = {**TrainConfig().to_dict(), **(saved.get("train") or {})}  # fields added since: defaults
    for key in ("model", "model_overrides"):
        if saved.get(key) != record[key]:
            raise ReslabError(f"{out_dir} holds an ablation with {key} {saved.get(key)}, not {record[key]}; "
                              "choose another --out to run a different experiment")
    from reslab.train.config import RESUMABLE_FIELDS

    # what `train --resume` may change, a re-run of the grid may too; but its length defines the experiment
    ignored = (RESUMABLE_FIELDS - {"steps"}) | {"seed"}
    differing = [k for k, v in record["train"].items() if k not in ignored and saved["train"].get(k) != v]
    if differing:
        key = differing[0]
        raise ReslabError(f"{out_dir} was run with {key}={saved['train'].get(key)}, not {record['train'][key]}; "
                          "choose another --out to run a different experiment")


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


def _report_point(console, point: GridPoint, summary: dict[str, Any]) -> None:
    if "diverged" in summary:
        _say(console, f"  {point.name:<24} diverged: {summary['diverged']}")
        return
    val = summary.get("final_val_loss")
    _say(console, f"  {point.name:<24} val {val:.4f}  {summary.get('tokens_per_second', 0):,.0f} tok/s"
         if val is not None else f"  {point.name}: no result")


def _say(console, message: str) -> None:
    if console is not None:
        console.print(message, highlight=False)


