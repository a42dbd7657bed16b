"""Aggregate an ablation directory: per (scheme, depth), mean and spread over seeds of each summary field that a
metric's declaration aggregates over seeds (`reslab.metrics`).

Below both the ablation (which aggregates when its grid is done) and the report (which aggregates again from the
runs on disk), so neither imports the other for it."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from reslab.ablationdir import SUMMARY, SUMMARY_CSV, AblationDir
from reslab.io import atomic_write, write_json
from reslab.metrics import SEED_STATS, point_values, seed_stats, seed_summaries
from reslab.rundir import CONFIG, DIVERGED, RunDir


def aggregated_keys() -> list[str]:
    """The summary fields aggregated over seeds, headline first (columns `<key>_mean`, `_std`, `_min`, `_max`)."""
    return [field.key for field in seed_summaries()]


def _groups(ablation: AblationDir, steps: int) -> tuple[dict, dict]:
    """Per (scheme, depth): each finished seed's values, and how many seeds diverged."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    diverged: dict[tuple[str, int], int] = {}
    for path in (p for p in ablation.run_dirs() if (p / CONFIG).exists()):
        run = RunDir(path)
        config = run.read_config()  # one error line for a damaged run, never a traceback
        key = (config["model_config"]["residual"], config["model_config"]["layers"])
        summary = run.read_summary()
        if summary is not None and summary.get("steps") == steps:
            groups.setdefault(key, []).append({**point_values(summary), "seed": config["train"]["seed"]})
        elif (run / DIVERGED).exists():
            diverged[key] = diverged.get(key, 0) + 1
            groups.setdefault(key, [])
    return groups, diverged


def summarize(out_dir: Path) -> dict[str, Any]:
    """Read every finished run under out_dir/runs and write summary.json and summary.csv; rows best-first."""
    ablation = AblationDir(out_dir)
    record = ablation.read_record()  # checked to be there by the caller
    groups, diverged = _groups(ablation, record["train"]["steps"])
    keys = aggregated_keys()
    rows = []
    for (residual, layers), points in groups.items():
        row: dict[str, Any] = {"residual": residual, "layers": layers, "seeds": len(points),
                               "diverged": diverged.get((residual, layers), 0)}
        for key in keys:
            for stat, value in seed_stats([p[key] for p in points]).items():
                row[f"{key}_{stat}"] = value
        rows.append(row)
    headline = f"{keys[0]}_mean"
    rows.sort(key=lambda r: (r[headline] is None, r[headline] or 0.0))
    result = {"model": record["model"], "steps": record["train"]["steps"], "rows": rows}
    write_json(ablation / SUMMARY, result)
    _write_csv(ablation / SUMMARY_CSV, rows, keys)
    return result


def _write_csv(path: Path, rows: list[dict[str, Any]], keys: list[str]) -> None:
    buffer = io.StringIO()
    columns = ["residual", "layers", "seeds", "diverged", *(f"{k}_{s}" for k in keys for s in SEED_STATS)]
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write(path, buffer.getvalue().encode())
