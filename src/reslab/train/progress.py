"""What a training run shows while it runs: a live rich progress bar on a terminal, plain lines elsewhere.

The bar moves every step, with an ETA from the measured step time, and fits 80 columns: the count and the ETA are
never cut; the name and the loss give way first (cut with an ellipsis). Off a terminal (a pipe, a CI log) one plain
line per log record, from step 0, and notes that are never hard-wrapped."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task
from rich.table import Column
from rich.text import Text


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
