"""The trackers a run's records go to beside metrics.jsonl (`--log`), each a small class behind one interface:

    Tracker       log(record) on every log/eval step, hparams(config, final) when the run finishes, close()
    TensorBoard   every declared metric's scalars (`reslab.metrics.tensorboard_scalars`), the hyper-parameters
                  (HParams: model and training config flattened, the run's final metrics) and the config as text
    WandB         the same scalars, config and final metrics in one W&B run; an ablation's points are grouped by it

Adding one (MLflow, ...) is a class here and its line in `TRACKERS`. The package a tracker needs is imported only
when it opens; `trackers` checks that it is installed before anything is written.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, NamedTuple, Protocol

from reslab.ablationdir import RUNS, AblationDir, parse_run_name
from reslab.errors import ReslabError
from reslab.io import finite_number
from reslab.metrics import tensorboard_scalars
from reslab.rundir import TENSORBOARD


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def hparams(self, config: dict[str, Any], final: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    """TensorBoard event files in the run's tensorboard/ directory."""

    def __init__(self, setup, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(setup.run / TENSORBOARD))
        text = json.dumps(config, indent=2, default=str)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))  # markdown: code
        self.step = 0

    def log(self, record: dict[str, Any]) -> None:
        self.step = record["step"]
        for tag, value in tensorboard_scalars(record):
            self.writer.add_scalar(tag, value, self.step)

    def hparams(self, config: dict[str, Any], final: dict[str, float]) -> None:
        # run_name ".": the HParams session lives in the run's own directory, beside the scalars it summarises
        self.writer.add_hparams(flat_config(config), {f"final/{k}": v for k, v in final.items()}, run_name=".",
                                global_step=self.step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """One W&B run per invocation (project: WANDB_PROJECT, default reslab; offline with WANDB_MODE=offline); a grid
    point of an ablation is grouped under the ablation directory's name."""

    def __init__(self, setup, config: dict[str, Any]):
        import wandb

        group, name = wandb_names(setup.run.path)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "reslab"), name=name, group=group,
                                  config=flat_config(config), settings=wandb.Settings(console="off", quiet=True))
        except wandb.Error as error:  # not logged in, no network, ...: one line, as every user error
            raise ReslabError(f"--log wandb: {' '.join(str(error).split())}; wandb login, or set WANDB_MODE=offline "
                              "to keep the run on this machine") from None

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(dict(tensorboard_scalars(record)), step=record["step"])

    def hparams(self, config: dict[str, Any], final: dict[str, float]) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in final.items()})

    def close(self) -> None:
        self.run.finish()


class Kind(NamedTuple):
    open: type
    module: str  # the package it imports
    extra: str  # reslab's extra that installs it


TRACKERS: dict[str, Kind] = {
    "tensorboard": Kind(TensorBoard, "tensorboard", "tensorboard"),
    "wandb": Kind(WandB, "wandb", "wandb"),
}


def installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKERS[name].module) is not None


def trackers(log: str) -> list[str]:
    """The trackers `--log` names: a comma list of TRACKERS, `none`, or `auto` (TensorBoard when installed). An
    unknown name or a missing package is one line naming the choices or the pip command."""
    names = [part.strip() for part in str(log).split(",") if part.strip()]
    if names == ["auto"]:
        return ["tensorboard"] if installed("tensorboard") else []
    if names == ["none"]:
        return []
    for name in names:
        if name not in TRACKERS:
            raise ReslabError(f"--log {log}: unknown tracker {name!r}; choose auto, none, or a comma list of "
                              f"{', '.join(TRACKERS)}")
        if not installed(name):
            extra = TRACKERS[name].extra
            raise ReslabError(f"--log {name} needs {TRACKERS[name].module}, which is not installed: pip install "
                              f"\"reslab[{extra}]\" (in a clone: pip install -c constraints.txt -e \".[{extra}]\")")
    return list(dict.fromkeys(names))


def open_trackers(setup) -> list[Tracker]:
    """The trackers of a run's `--log`, opened (each closed again if a later one fails to open)."""
    config = run_config(setup)
    opened: list[Tracker] = []
    try:
        for name in trackers(setup.config.log):
            opened.append(TRACKERS[name].open(setup, config))
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    return opened


def run_config(setup) -> dict[str, Any]:
    """What a tracker records as the run's config: config.json's model, model_config, train and data."""
    return {"model": setup.model_name, "model_config": setup.model_config, "train": setup.config.to_dict(),
            "data": setup.data}


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested objects flattened to `outer.inner` keys; lists and None as JSON text (what HParams and W&B take)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            keep = isinstance(value, (bool, int, float, str))
            flat[f"{prefix}{key}"] = value if keep else json.dumps(value, default=str)
    return flat


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a run's summary fields (`reslab.metrics.run_summary`): HParams' metrics."""
    return {key: float(value) for key, value in summary.items()
            if finite_number(value)}


def wandb_names(run_dir) -> tuple[str | None, str]:
    """(group, name) of a run's W&B run: a grid point of an ablation is grouped under the ablation's name."""
    ablation = AblationDir(run_dir.parent.parent)
    if parse_run_name(run_dir.name) and run_dir.parent.name == RUNS and ablation.has_record():
        return ablation.path.resolve().name, run_dir.name
    return None, run_dir.resolve().name
