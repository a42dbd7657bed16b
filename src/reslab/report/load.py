"""Read an ablation directory (see reslab.ablate.grid) into plain Python objects for the plots and the report.

Tolerant by design: a run without metrics, a run stopped half way, a diverged run, a metrics line cut off by a
crash, or a scheme that this version of reslab no longer registers all still produce a report. metrics.jsonl is read
by `reslab.rundir.read_metrics`, with its one damage policy: a damaged line other than a cut-off last one is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reslab.ablation_summary import summarize
from reslab.ablationdir import RECORD, AblationDir, parse_run_name
from reslab.errors import ReslabError
from reslab.io import finite_number, parse_json, read_json_file
from reslab.rundir import CONFIG, DIVERGED, METRICS, SUMMARY, DamagedRunError, read_metrics

_DAMAGE_FIX = "repair the file or delete it, then write the report again"


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
            if finite_number(value):
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


def _read_json_quiet(path: Path) -> Any:
    """A JSON file, or None when it is unreadable or not JSON (a file cut off by a crash); JSON nested too deep to
    read is damage that would otherwise go unnoticed: one DamagedRunError line naming the file."""
    text = _read_text(path)
    if text is None:
        return None
    return parse_json(text, str(path), _DAMAGE_FIX, allow_nan=True, error=DamagedRunError, invalid=None)


def load_ablation(path: Path, baseline: str | None = None, target_loss: float | None = None) -> Ablation:
    """Read ablation.json, summary.json (recomputed if missing) and every run under runs/; `baseline` and
    `target_loss` as in `reslab.ablation_summary.summarize`."""
    ablation = AblationDir(path).check()
    path = ablation.path
    meta = read_json_file(ablation / RECORD, "run the ablation again into it, or restore the file",
                          what="ablation record", allow_nan=True)
    if not isinstance(meta, dict):
        raise ReslabError(f"{ablation / RECORD} is not an ablation record (expected a JSON object)")
    runs = [_load_run(run_dir, meta) for run_dir in ablation.run_dirs()]
    runs = [run for run in runs if run is not None]
    summary = {"rows": []}
    if runs:  # aggregated again from the runs on disk: summary.json may be stale (runs removed, damaged, added)
        summary = summarize(path, baseline, target_loss)  # a damaged run is one error line naming it
    summary.setdefault("rows", [])
    return Ablation(path, meta, summary, runs)


def _load_run(run_dir: Path, meta: dict[str, Any]) -> Run | None:
    config = _read_json_quiet(run_dir / CONFIG)
    config = config if isinstance(config, dict) else {}
    model_config = config.get("model_config") or {}
    point = parse_run_name(run_dir.name)
    residual = model_config.get("residual") or (point and point.residual)
    layers = model_config.get("layers") or (point and point.layers)
    seed = (config.get("train") or {}).get("seed")
    if seed is None and point:
        seed = point.seed
    if not residual or not isinstance(layers, int):
        return None  # not a run directory
    run = Run(run_dir.name, residual, layers, seed if isinstance(seed, int) else 0, config=config)
    run.records = read_metrics(run_dir / METRICS)
    summary = _read_json_quiet(run_dir / SUMMARY)
    diverged = _read_json_quiet(run_dir / DIVERGED)
    steps = (meta.get("train") or {}).get("steps")
    if isinstance(summary, dict) and (steps is None or summary.get("steps") == steps):
        run.summary, run.status = summary, "finished"
    elif isinstance(diverged, dict):
        run.status, run.message = "diverged", str(diverged.get("message", ""))
    elif run.records:
        run.status = "incomplete"
    return run
