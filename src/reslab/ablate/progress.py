"""What `reslab ablate` shows while its grid trains: on a terminal, a live display (points done / running / queued,
the overall ETA, a bar per running point at its current step); elsewhere, one plain line as each point starts (and
the grid's line as each finishes, `reslab.ablate.grid`), no control characters.

Executors (`reslab.ablate.executors`) say only when a point finishes; a point is seen running by its run directory:
its metrics.jsonl is written (created, or rewritten on resume) when its training starts and appended at every log
record, whose last line holds its current step. So the display works the same for every executor, in this process,
in a pool of processes, or as Ray tasks that write in place."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from reslab.ablate.point import GridJob, GridPoint
from reslab.rundir import METRICS, peek_last_metrics
from reslab.train.loggers import StepClock, format_eta, make_console, stats_text, step_bars


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_ino


@dataclass
class PointState:
    start_step: int  # where it begins: 0, or a stopped point's last record
    stamp: tuple[int, int] | None  # its metrics.jsonl when the grid began: a change says it started
    step: int = 0
    state: str = "queued"  # queued, running, done
    stats: str = ""  # its last record's losses
    clock: StepClock = field(default_factory=StepClock)

    def read(self, path: Path, steps: int) -> None:
        """Its current step and losses, from the last record of its metrics.jsonl."""
        record = peek_last_metrics(path)
        if record.get("step", -1) > self.step:
            self.step = min(record["step"], steps)
            self.clock.tick(self.step)
            self.stats = stats_text(record.get("loss"), record.get("val_loss"), None)


class GridProgress:
    """The ablation's progress while `executor.run` trains `todo` (a context manager): `finished(point)` as each
    point's result arrives; a thread looks at the running points' metrics.jsonl every `interval` seconds."""

    def __init__(self, console, job: GridJob, todo: list[GridPoint], done_before: int, interval: float = 1.0):
        self.console = make_console(console) if console is not None else None  # off a terminal: soft wrap
        self.job, self.interval, self.done_before = job, interval, done_before
        self.points = {point: self._state(point) for point in todo}
        self.clock = StepClock()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._bars, self._overall = None, None
        self._tasks: dict[GridPoint, int] = {}

    def _state(self, point: GridPoint) -> PointState:
        path = self.job.run_dir(point) / METRICS
        start = min(peek_last_metrics(path).get("step", 0), self.job.steps)
        return PointState(start, _stamp(path), step=start)

    @property
    def live(self) -> bool:
        return self.console is not None and self.console.is_terminal

    def __enter__(self) -> GridProgress:
        if self.console is None or not self.points:
            return self
        if self.live:
            self._bars = step_bars(self.console)
            self._overall = self._bars.add_task("grid", total=self._total(), name="grid", stats="", eta=None)
            self._bars.start()
        self._look()
        self._thread = threading.Thread(target=self._watch, name="reslab-ablate-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
        if self._bars is not None:
            self._bars.stop()

    def finished(self, point: GridPoint) -> None:
        """`point`'s result arrived (trained, diverged, or read back): its start line first, if none was seen."""
        with self._lock:
            state = self.points.get(point)
            if state is None or state.state == "done":
                return
            if state.state == "queued":
                self._started(point, state)
            state.state, state.step = "done", self.job.steps
            self._show()

    def _watch(self) -> None:
        while not self._stopped.wait(self.interval):
            self._look()

    def _look(self) -> None:
        """Each point not done: started (its metrics.jsonl changed since the grid began)? At which step?"""
        with self._lock:
            for point, state in self.points.items():
                if state.state == "done":
                    continue
                path = self.job.run_dir(point) / METRICS
                if state.state == "queued" and _stamp(path) not in (None, state.stamp):
                    self._started(point, state)
                if state.state == "running":
                    state.read(path, self.job.steps)
            self._show()

    def _started(self, point: GridPoint, state: PointState) -> None:
        state.state = "running"
        if not self.live and self.console is not None:
            self.console.print(f"  {point.name:<24} started ({self._counts()})", highlight=False)

    def _counts(self) -> str:
        states = [s.state for s in self.points.values()]
        done = self.done_before + states.count("done")
        return (f"{done}/{self.done_before + len(states)} done, {states.count('running')} running, "
                f"{states.count('queued')} queued")

    def _total(self) -> int:
        return sum(self.job.steps - s.start_step for s in self.points.values())

    def eta(self) -> float | None:
        """Seconds to the grid's end, from the steps all its points made (in parallel) since it began."""
        trained = sum(s.step - s.start_step for s in self.points.values())
        self.clock.tick(trained)
        return self.clock.eta(self._total())

    def _show(self) -> None:
        eta = self.eta()
        if self._bars is None:
            return
        trained = sum(s.step - s.start_step for s in self.points.values())
        self._bars.update(self._overall, completed=trained, eta=eta, stats=self._counts())
        for point, state in self.points.items():
            if state.state == "running" and point not in self._tasks:
                self._tasks[point] = self._bars.add_task(point.name, total=self.job.steps, name=point.name,
                                                         stats="", eta=None)
            if point in self._tasks:
                self._bars.update(self._tasks[point], completed=state.step, stats=state.stats,
                                  eta=state.clock.eta(self.job.steps))
            if state.state == "done" and point in self._tasks:
                self._bars.remove_task(self._tasks.pop(point))

    def counts_note(self) -> str:
        """Off a terminal, `  (3/6 done, 2 running, 1 queued, ETA 0:01:23)` for the line of a point that finished;
        on one, nothing (the live display shows them)."""
        if self.live or not self.points:
            return ""
        eta = self.clock.eta(self._total()) if any(s.state != "done" for s in self.points.values()) else None
        return f"  ({self._counts()}" + (f", ETA {format_eta(eta)}" if eta is not None else "") + ")"
