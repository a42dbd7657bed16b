"""One grid point of an ablation and how it is trained: what every executor (`reslab.ablate.executors`) runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reslab.ablationdir import AblationDir, run_name
from reslab.io import write_json
from reslab.rundir import CONFIG, DIVERGED, RunDir


@dataclass(frozen=True)
class GridPoint:
    residual: str
    layers: int
    seed: int

    @property
    def name(self) -> str:
        return run_name(self.residual, self.layers, self.seed)


@dataclass(frozen=True)
class GridJob:
    """What every point of one ablation shares: the model, its config and training overrides, the ablation
    directory (a point's run directory is `out_dir/runs/<point>`) and the time the ablation started, which tells
    the driver's directory from a namesake on another machine."""

    model: str
    model_overrides: dict[str, Any]
    train_overrides: dict[str, Any]  # with "steps"
    out_dir: Path
    started: float

    @property
    def steps(self) -> int:
        return self.train_overrides["steps"]

    def run_dir(self, point: GridPoint) -> Path:
        return AblationDir(self.out_dir).run_path(point.residual, point.layers, point.seed)

    def is_driver_dir(self) -> bool:
        """Whether `out_dir` is the driver's ablation directory (seen from the process this runs in)."""
        ablation = AblationDir(self.out_dir)
        return ablation.has_record() and (ablation.read_record() or {}).get("started") == self.started


def point_status(run_dir: Path, steps: int) -> str:
    """'done' (summary written for these steps), 'diverged', 'partial' (a checkpoint to resume) or 'new'."""
    run = RunDir(run_dir)
    summary = run.read_summary()  # a damaged one is one error line naming it
    if summary is not None and summary.get("steps") == steps:
        return "done"
    diverged = run.read_json_file(DIVERGED)
    if isinstance(diverged, dict) and diverged.get("steps") == steps:
        return "diverged"
    if run.checkpointed_evidence() and (run / CONFIG).exists():
        return "partial"  # resumed; a checkpoint lost after training is refused there, never trained over
    return "new"


def run_point(point: GridPoint, job: GridJob, run_dir: Path | None = None, threads: int | None = None
              ) -> dict[str, Any]:
    """Train one grid point into `run_dir` (default: its place in the ablation directory) and return its summary:
    a finished point's is read back, a stopped one resumed. `threads`: torch threads (None: as configured)."""
    import torch

    from reslab.train.trainer import NonFiniteLoss, prepare, train

    if threads is not None:
        torch.set_num_threads(threads)
    run_path = Path(run_dir or job.run_dir(point))
    status = point_status(run_path, job.steps)
    if status == "done":
        return RunDir(run_path).read_summary()
    if status == "diverged":
        return {"diverged": str(RunDir(run_path).read_json_file(DIVERGED).get("message", ""))}
    config = {**job.train_overrides, "model": job.model, "seed": point.seed, "progress": False}
    overrides = {**job.model_overrides, "residual": point.residual, "layers": point.layers}
    if status == "partial":
        runtime = {"progress": False, "steps": config["steps"], "stop_at": config.get("stop_at")}
        setup = prepare({k: v for k, v in runtime.items() if v is not None}, {}, run_path, resume=True)
    else:
        setup = prepare(config, overrides, run_path, overwrite=run_path.exists())
    try:
        return train(setup)
    except NonFiniteLoss as error:  # a diverged run is a result of the experiment, not a crash of the grid
        write_json(run_path / DIVERGED, {"message": str(error), "steps": job.steps})
        return {"diverged": str(error)}
