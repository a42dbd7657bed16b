"""Read an ablation directory (see reslab.ablate.grid) into plain Python objects for the plots and the report.

Tolerant by design: a run without metrics, a run stopped half way, a diverged run, a metrics line cut off by a
crash, or a scheme that this version of reslab no longer registers all still produce a report.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reslab.errors import ReslabError
from reslab.jsonfile import parse_json, read_json_file
from reslab.rundir import DamagedRunError

_DAMAGE_FIX = "repair the file or delete it, then write the report again"

_RUN_NAME = re.compile(r"^(?P<residual>.+)-L(?P<layers>\d+)-s(?P<seed>-?\d+)$")


@dataclass
class Run:
    """One grid point: its identity, its logged records (metrics.jsonl) and how it ended."""

    name: str
    residual: str
    layers: int
    seed: int
    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    status: str = "new"  # finished, diverged, incomplete, new
    message: str = ""  # why it diverged, when it did

    @property
    def last_step(self) -> int:
        return max((r.get("step", 0) for r in self.records), default=0)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a scalar metric, finite values only."""
        steps, values = [], []
        for record in self.records:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                steps.append(record["step"])
                values.append(float(value))
        return steps, values

    def last_with(self, key: str) -> dict[str, Any] | None:
        """The last record that has `key` (e.g. the final diagnostics)."""
        for record in reversed(self.records):
            if record.get(key) is not None:
                return record
        return None


@dataclass
class Ablation:
    path: Path
    meta: dict[str, Any]  # ablation.json
    summary: dict[str, Any]  # summary.json (rows best-first)
    runs: list[Run]

    @property
    def steps(self) -> int | None:
        return (self.meta.get("train") or {}).get("steps")

    @property
    def schemes(self) -> list[str]:
        """Schemes in grid order, then any found only among the runs."""
        names = list((self.meta.get("grid") or {}).get("residual") or [])
        names += [row.get("residual") for row in self.summary.get("rows", [])]
        names += [run.residual for run in self.runs]
        return _unique(n for n in names if isinstance(n, str))

    @property
    def depths(self) -> list[int]:
        depths = list((self.meta.get("grid") or {}).get("layers") or [])
        depths += [run.layers for run in self.runs]
        return sorted(_unique(d for d in depths if isinstance(d, int)))

    @property
    def seeds(self) -> list[int]:
        return list((self.meta.get("grid") or {}).get("seeds") or sorted(_unique(r.seed for r in self.runs)))

    def runs_for(self, residual: str, layers: int) -> list[Run]:
        return [r for r in self.runs if r.residual == residual and r.layers == layers]

    @property
    def vocab_size(self) -> int | None:
        for run in self.runs:
            size = (run.config.get("model_config") or {}).get("vocab_size")
            if isinstance(size, int) and size > 1:
                return size
        return None


def _unique(items) -> list:
    seen: dict = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _parse_quiet(text: str | None, source: str) -> Any:
    """JSON `text`, or None when it is not JSON (a file cut off by a crash); JSON nested too deep to read is damage
    that would otherwise go unnoticed: one DamagedRunError line naming `source`."""
    if text is None:
        return None
    return parse_json(text, source, _DAMAGE_FIX, allow_nan=True, error=DamagedRunError, invalid=None)


def _read_json_quiet(path: Path) -> Any:
    return _parse_quiet(_read_text(path), str(path))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a line cut off by a crash (or otherwise unreadable) is skipped."""
    records = []
    lines = (_read_text(path) or "").splitlines()
    for number, line in enumerate(lines, 1):
        record = _parse_quiet(line, f"{path} line {number}")
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def check_ablation_dir(path: Path) -> Path:
    """The ablation directory, or a one-line ReslabError saying what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise ReslabError(f"{path} does not exist; give an ablation directory (the --out of `reslab ablate`)")
    if not path.is_dir():
        raise ReslabError(f"{path} is a file, not an ablation directory (the --out of `reslab ablate`)")
    if not (path / "ablation.json").exists():
        raise ReslabError(f"{path} is not an ablation directory: it has no ablation.json; "
                          "run `reslab ablate --out DIR` first")
    return path


def load_ablation(path: Path) -> Ablation:
    """Read ablation.json, summary.json (recomputed if missing) and every run under runs/."""
    path = check_ablation_dir(path)
    meta = read_json_file(path / "ablation.json", "run the ablation again into it, or restore the file",
                          what="ablation record", allow_nan=True)
    if not isinstance(meta, dict):
        raise ReslabError(f"{path / 'ablation.json'} is not an ablation record (expected a JSON object)")
    runs = [_load_run(run_dir, meta) for run_dir in sorted((path / "runs").glob("*")) if run_dir.is_dir()]
    runs = [run for run in runs if run is not None]
    summary = {"rows": []}
    if runs:  # aggregated again from the runs on disk: summary.json may be stale (runs removed, damaged, added)
        from reslab.ablate.summary import summarize

        summary = summarize(path)  # a damaged run is one error line naming it
    summary.setdefault("rows", [])
    return Ablation(path, meta, summary, runs)


def _load_run(run_dir: Path, meta: dict[str, Any]) -> Run | None:
    config = _read_json_quiet(run_dir / "config.json")
    config = config if isinstance(config, dict) else {}
    model_config = config.get("model_config") or {}
    match = _RUN_NAME.match(run_dir.name)
    residual = model_config.get("residual") or (match and match["residual"])
    layers = model_config.get("layers") or (match and int(match["layers"]))
    seed = (config.get("train") or {}).get("seed")
    if seed is None and match:
        seed = int(match["seed"])
    if not residual or not isinstance(layers, int):
        return None  # not a run directory
    run = Run(run_dir.name, residual, layers, seed if isinstance(seed, int) else 0, config=config)
    run.records = read_metrics(run_dir / "metrics.jsonl")
    summary = _read_json_quiet(run_dir / "summary.json")
    diverged = _read_json_quiet(run_dir / "diverged.json")
    steps = (meta.get("train") or {}).get("steps")
    if isinstance(summary, dict) and (steps is None or summary.get("steps") == steps):
        run.summary, run.status = summary, "finished"
    elif isinstance(diverged, dict):
        run.status, run.message = "diverged", str(diverged.get("message", ""))
    elif run.records:
        run.status = "incomplete"
    return run
