"""Run an ablation grid: one run directory per (scheme, depth, seed), finished points skipped, stopped ones resumed.
The ablation directory's layout is `reslab.ablationdir`'s."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from reslab.ablate.executors import Executor, InlineExecutor
from reslab.ablate.point import DIVERGED, GridJob, GridPoint, point_status
from reslab.ablationdir import RECORD as ABLATION
from reslab.ablationdir import AblationDir
from reslab.errors import ReslabError
from reslab.rundir import CONFIG

__all__ = ["ABLATION", "DIVERGED", "GridPoint", "grid_points", "point_status", "run_ablation"]


def grid_points(residuals: list[str], layers: list[int], seeds: list[int]) -> list[GridPoint]:
    return [GridPoint(r, n, s) for n in layers for r in residuals for s in seeds]


def run_ablation(out_dir: Path, model: str, residuals: list[str], layers: list[int], seeds: list[int],
                 model_overrides: dict[str, Any], train_overrides: dict[str, Any], executor: Executor | None = None,
                 command: list[str] | None = None, console=None, compare: dict[str, Any] | None = None,
                 shuffle: int | None = None) -> dict[str, Any]:
    """Train every grid point not yet finished, then write summary.json / summary.csv. Returns the summary.

    `executor` trains the points (`reslab.ablate.executors`): in this process (the default), in a pool of local
    processes, or as Ray tasks. `compare`: {"baseline": scheme, "target_loss": loss}, recorded in ablation.json for
    the summary and the report (`reslab.ablation_summary`). `shuffle`: train the points in an order shuffled with
    this seed (so that a drift in the machine's speed does not line up with one scheme), else in grid order.
    """
    from reslab.models import make_config
    from reslab.train.config import TrainConfig

    out_dir = Path(out_dir)
    points = grid_points(residuals, layers, seeds)
    # Validate every grid point's config up front: a typo must not surface after an hour of training.
    for point in points:
        make_config(model, **{**model_overrides, "residual": point.residual, "layers": point.layers})
    train_overrides = _keep_saved_dtype(out_dir, train_overrides)
    train_config = TrainConfig.from_dict({**train_overrides, "model": model})
    _check_data(train_config.data)
    train_record = {k: v for k, v in train_config.to_dict().items() if k != "seed"}  # seeds are in the grid
    record = {"command": command or [], "model": model, "grid": {"residual": residuals, "layers": layers,
              "seeds": seeds}, "model_overrides": model_overrides, "train": train_record,
              **{k: v for k, v in (compare or {}).items() if v is not None}}
    if compare and compare.get("baseline") is not None and compare["baseline"] not in residuals:
        raise ReslabError(f"--baseline {compare['baseline']} is not in --residual {','.join(residuals)}; add it "
                          "there or choose one of them")
    if shuffle is not None:
        random.Random(shuffle).shuffle(points)
    _check_ablation_dir(out_dir, record)
    with AblationDir(out_dir).locked():  # one ablation per directory at a time
        # every point trains in the dtype the driver resolved and recorded (a Ray node with other hardware too)
        train = {**train_overrides, "dtype": train_config.dtype, "steps": train_config.steps}
        job = GridJob(model, model_overrides, train, out_dir, time.time())
        return _run_grid(job, points, record, executor or InlineExecutor(), console)


def _run_grid(job: GridJob, points: list[GridPoint], record: dict[str, Any], executor: Executor,
              console) -> dict[str, Any]:
    from reslab.ablate.progress import GridProgress
    from reslab.ablate.summary import summarize

    todo = [p for p in points if point_status(job.run_dir(p), job.steps) not in ("done", "diverged")]
    ablation = AblationDir(job.out_dir)
    ablation.write_record({**record, "started": job.started, "finished": None})
    _say(console, f"ablation {job.out_dir}: {len(points)} grid points, {len(points) - len(todo)} already done, "
                  f"{len(todo)} to train {executor.describe()}")
    with GridProgress(console, job, todo, done_before=len(points) - len(todo)) as progress:
        for point, result in executor.run(todo, job):
            progress.finished(point)
            _report_point(console, point, result, progress.counts_note())
    summary = summarize(job.out_dir)
    ablation.write_record({**record, "started": job.started, "finished": time.time(),
                           "wall_seconds": time.time() - job.started})
    return summary


def _keep_saved_dtype(out_dir: Path, train_overrides: dict[str, Any]) -> dict[str, Any]:
    """A re-run under `--dtype auto` (the default) continues the grid in the dtype it was started in, as `train
    --resume` does: a grid begun in fp32 (or on another machine) is not finished in bf16."""
    ablation = AblationDir(out_dir)
    if train_overrides.get("dtype", "auto") != "auto" or not ablation.has_record():
        return train_overrides
    saved = ablation.read_record()
    train = saved.get("train") if isinstance(saved, dict) else None
    dtype = _saved_train_fields(train)["dtype"] if isinstance(train, dict) else None
    return {**train_overrides, "dtype": dtype} if dtype in ("fp32", "bf16") else train_overrides


def _saved_train_fields(train: dict[str, Any]) -> dict[str, Any]:
    """A saved record's train fields, those added since it was written at their defaults (a record from before
    dtype was recorded trained in fp32)."""
    from reslab.train.config import TrainConfig

    return {**TrainConfig().to_dict(), "dtype": "fp32", **train}


def _check_data(source: str) -> None:
    """A data file that cannot be read fails here, before the ablation directory is touched (a named corpus is
    checked by the first point)."""
    from reslab.data.sources import NAMED_SOURCES, load_text

    if source not in NAMED_SOURCES:
        load_text(source)


def _check_ablation_dir(out_dir: Path, record: dict[str, Any]) -> None:
    """Re-running into the same directory continues it; a different experiment must not mix into it."""
    ablation = AblationDir(out_dir)
    if not (ablation / ABLATION).exists():
        if not ablation.holds_only_the_lock():
            raise ReslabError(f"{out_dir} is not empty and is not an ablation directory; choose another --out")
        return
    saved = ablation.read_record()
    if not isinstance(saved, dict) or not isinstance(saved.get("train", {}), dict):
        raise ReslabError(f"{ablation / ABLATION} is not an ablation record (a JSON object); restore it, or choose "
                          "another --out")
    if not any((p / CONFIG).exists() for p in ablation.run_dirs()):
        return  # no point has started (an earlier attempt failed on its input): nothing here to protect
    saved["train"] = _saved_train_fields(saved.get("train") or {})
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


def _report_point(console, point: GridPoint, summary: dict[str, Any], counts: str) -> None:
    if "diverged" in summary:
        _say(console, f"  {point.name:<24} diverged: {summary['diverged']}{counts}")
        return
    val = summary.get("final_val_loss")
    _say(console, f"  {point.name:<24} val {val:.4f}  {summary.get('tokens_per_second', 0):,.0f} tok/s{counts}"
         if val is not None else f"  {point.name}: no result{counts}")


def _say(console, message: str) -> None:
    if console is not None:  # off a terminal not wrapped at 80 columns: a long line stays one line in a log
        console.print(message, highlight=False, soft_wrap=not console.is_terminal)
