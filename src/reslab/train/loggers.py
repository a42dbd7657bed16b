"""Where a run's records go while it runs: the console, and the trackers beside metrics.jsonl (`--log`).

## The console

A live rich progress bar on a terminal (`Reporter`), plain lines elsewhere. The bar moves every step, with an ETA
from the measured step time, and fits 80 columns: the count and the ETA are never cut; the name and the loss give way
first (cut with an ellipsis). Off a terminal (a pipe, a CI log) one plain line per log record, from step 0, and notes
that are never hard-wrapped.

## Trackers

Each a small class behind one interface:

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
import time
from typing import Any, NamedTuple, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task
from rich.table import Column
from rich.text import Text

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


class StepClock:
    """Seconds per step, measured from the first step this process saw to the latest: the ETA's base (the time
    before the first step, compile and data loading, is not a step)."""

    def __init__(self) -> None:
        self.first: tuple[int, float] | None = None
        self.last: tuple[int, float] | None = None

    def tick(self, step: int) -> None:
        now = time.perf_counter()
        if self.first is None or step < self.first[0]:
            self.first = (step, now)
        self.last = (step, now)

    def eta(self, total: int) -> float | None:
        """Seconds to step `total`, or None before two steps were measured."""
        if self.first is None or self.last is None or self.last[0] <= self.first[0]:
            return None
        per_step = (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])
        return max(total - self.last[0], 0) * per_step


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class FieldColumn(ProgressColumn):
    """A task's text field that gives way when the line is narrow: cut with an ellipsis, never wrapped."""

    def __init__(self, field: str, style: str = ""):
        super().__init__(table_column=Column(no_wrap=False, overflow="ellipsis"))
        self.field, self.style = field, style

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get(self.field, "")), style=self.style, no_wrap=True, overflow="ellipsis")


class EtaColumn(ProgressColumn):
    """`ETA H:MM:SS` from the task's `eta` field (seconds, measured by a `StepClock`)."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True))

    def render(self, task: Task) -> Text:
        return Text(f"ETA {format_eta(task.fields.get('eta'))}", style="progress.remaining")


def step_bars(console: Console) -> Progress:
    """NAME BAR DONE/TOTAL ETA H:MM:SS STATS, one row per task: the fields a task needs are `name`, `stats`, `eta`.
    The bar is narrow on an 80-column terminal, wider on a wide one."""
    bar_width = max(10, min(40, console.width - 70))
    fixed = Column(no_wrap=True)
    return Progress(FieldColumn("name", style="bold"), BarColumn(bar_width=bar_width, table_column=fixed),
                    MofNCompleteColumn(table_column=fixed.copy()), EtaColumn(), FieldColumn("stats"),
                    console=console, transient=False, refresh_per_second=4)


def make_console(console: Console | None = None) -> Console:
    """stderr (stdout stays data); off a terminal, lines are not wrapped at 80 columns (soft wrap)."""
    console = console or Console(stderr=True, highlight=False)
    if not console.is_terminal:
        console.soft_wrap = True
    return console


def stats_text(loss: float | None, val_loss: float | None, tokens_per_second: float | None) -> str:
    parts = []
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if val_loss is not None:
        parts.append(f"val {val_loss:.4f}")
    if tokens_per_second:
        parts.append(f"{tokens_per_second:,.0f} tok/s")
    return "  ".join(parts)


class Reporter:
    """Progress for one run. `enabled=False` prints nothing but notes; output goes to stderr so stdout stays data.
    The trainer calls `advance` after every step and `update` with every log record."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.console = make_console(console)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self.step, self.total = 0, 0
        self.clock = StepClock()
        self._progress: Progress | None = None
        self._task = None

    def start(self, total: int, completed: int, title: str) -> None:
        self.step, self.total = completed, total  # the clock starts at the first step: compiling is not a step
        if not self.enabled:
            return
        if not self.live:
            self.console.print(f"training {title}: steps {completed} -> {total}")
            self.console.print(self._line(completed, ""))
            return
        self._progress = step_bars(self.console)
        self._task = self._progress.add_task("train", total=total, completed=completed, name=title, stats="",
                                             eta=None)
        self._progress.start()

    def advance(self, step: int) -> None:
        """A step finished: the bar's count and ETA move (no rendering here; the bar redraws 4 times a second)."""
        self.step = step
        self.clock.tick(step)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, eta=self.clock.eta(self.total))

    def update(self, step: int, loss: float | None, val_loss: float | None, tokens_per_second: float | None,
               eval_done: bool = False) -> None:
        if step != self.step:
            self.advance(step)
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, stats=stats_text(loss, val_loss, tokens_per_second))
        else:
            self.console.print(self._line(step, stats_text(loss, val_loss if eval_done else None, tokens_per_second)))

    def _line(self, step: int, stats: str) -> str:
        """One plain progress line: `step 50/2000  loss 3.1234  val 3.2000  12,345 tok/s  ETA 0:01:23`."""
        width, eta = len(str(self.total)), self.clock.eta(self.total)
        eta_text = f"ETA {format_eta(eta)}" if eta is not None else ""
        return "  ".join(part for part in (f"step {step:>{width}}/{self.total}", stats, eta_text) if part)

    def grad_norms(self, step: int, norms: dict[str, float], total: float) -> None:
        """The TinyTransformer article's printout: every parameter's gradient norm."""
        lines = [f"step {step}: gradient norms (total {total:.4f})"]
        lines += [f"  {name}: {value:.6f}" for name, value in norms.items()]
        self.console.print("\n".join(lines))

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
