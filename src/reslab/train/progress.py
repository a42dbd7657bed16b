"""What a training run shows while it runs: a live rich progress bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Reporter:
    """Progress for one run. `enabled=False` prints nothing but notes; output goes to stderr so stdout stays data."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.console = console or Console(stderr=True, highlight=False)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None

    def start(self, total: int, completed: int, title: str) -> None:
        if not self.enabled:
            return
        if not self.live:
            self.console.print(f"training {title}: steps {completed} -> {total}")
            return
        self._progress = Progress(
            TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self._task = self._progress.add_task("train", total=total, completed=completed, stats="")
        self._progress.start()

    def update(self, step: int, loss: float | None, val_loss: float | None, tokens_per_second: float | None,
               eval_done: bool = False) -> None:
        if not self.enabled:
            return
        parts = [f"step {step}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if val_loss is not None:
            parts.append(f"val {val_loss:.4f}")
        if tokens_per_second:
            parts.append(f"{tokens_per_second:,.0f} tok/s")
        stats = "  ".join(parts)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=stats)
        elif eval_done:
            self.console.print(stats)

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


