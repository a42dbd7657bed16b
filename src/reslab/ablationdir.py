"""The ablation directory, beside the run directory (`reslab.rundir`): the names of its files, the name of each grid
point's run directory (built and parsed here only), and its lock.

    runs/ablation/
        .reslab-lock                  held by `reslab ablate` while it trains the grid
        ablation.json                 the command, the grid, the model and training config, start and end time
        runs/<scheme>-L<depth>-s<seed>/   one run directory per grid point (reslab.rundir)
        summary.json, summary.csv     mean, spread and 95% interval over seeds per (scheme, depth), and every
                                      scheme against the baseline (reslab.ablation_summary)
        comparisons.csv               those paired comparisons, one row per (scheme, depth, field)
        plots/*.png, report.html      written by reslab.report
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, NamedTuple

from reslab.errors import ReslabError
from reslab.io import write_json
from reslab.rundir import LOCK, RunDir, lock_directory

RECORD = "ablation.json"
RUNS = "runs"
SUMMARY = "summary.json"
SUMMARY_CSV = "summary.csv"
COMPARISONS_CSV = "comparisons.csv"
PLOTS = "plots"
REPORT = "report.html"

_RUN_NAME = re.compile(r"^(?P<residual>.+)-L(?P<layers>\d+)-s(?P<seed>-?\d+)$")


class PointName(NamedTuple):
    residual: str
    layers: int
    seed: int


def run_name(residual: str, layers: int, seed: int) -> str:
    """The run directory name of a grid point: `<scheme>-L<depth>-s<seed>`."""
    return f"{residual}-L{layers}-s{seed}"


def parse_run_name(name: str) -> PointName | None:
    """The grid point a run directory name stands for, or None when it is not one `run_name` builds."""
    match = _RUN_NAME.match(name)
    return PointName(match["residual"], int(match["layers"]), int(match["seed"])) if match else None


class AblationDir:
    """One ablation directory. Nothing here writes unless asked to."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"AblationDir({str(self.path)!r})"

    def run_path(self, residual: str, layers: int, seed: int) -> Path:
        return self.run_dir(run_name(residual, layers, seed))

    def run_dir(self, name: str) -> Path:
        """The run directory `name` under runs/."""
        return self.path / RUNS / name

    def run_dirs(self) -> list[Path]:
        """Every directory under runs/, sorted by name."""
        return sorted(p for p in (self.path / RUNS).glob("*") if p.is_dir())

    def has_record(self) -> bool:
        return (self.path / RECORD).is_file()

    def read_record(self) -> Any:
        """ablation.json as written (None when absent); invalid JSON is one DamagedRunError line."""
        return RunDir(self.path).read_json_file(RECORD)

    def write_record(self, record: dict[str, Any]) -> None:
        write_json(self.path / RECORD, record)

    def check(self) -> AblationDir:
        """This directory, or a one-line ReslabError saying why it is not an ablation directory."""
        path = self.path
        if not path.exists():
            raise ReslabError(f"{path} does not exist; give an ablation directory (the --out of `reslab ablate`)")
        if not path.is_dir():
            raise ReslabError(f"{path} is a file, not an ablation directory (the --out of `reslab ablate`)")
        if not (path / RECORD).exists():
            raise ReslabError(f"{path} is not an ablation directory: it has no {RECORD}; "
                              "run `reslab ablate --out DIR` first")
        return self

    def holds_only_the_lock(self) -> bool:
        """Absent, empty, or nothing in it but its lock (an attempt that failed on its input)."""
        return not self.path.exists() or all(p.name == LOCK for p in self.path.iterdir())

    def locked(self, what: str = "reslab ablate") -> contextlib.AbstractContextManager[None]:
        """One ablation per directory at a time: a second process gets one line naming the holder."""
        return lock_directory(self.path, what)
