"""Aggregate an ablation directory: per (scheme, depth), mean and spread over seeds of each headline number."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from reslab.io import atomic_write, write_json
from reslab.rundir import CONFIG, DIVERGED, RunDir

METRICS = ("final_val_loss", "best_val_loss", "first_layer_grad_share", "final_stream_rms", "mean_drift",
           "tokens_per_second")


def _point_metrics(summary: dict[str, Any]) -> dict[str, float | None]:
    values = {key: summary.get(key) for key in METRICS}
    rms = summary.get("final_stream_rms")
    values["final_stream_rms"] = rms[-1] if rms else None  # the stream that reaches the head
    return values


def _stats(values: list[float]) -> dict[str, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def summarize(out_dir: Path) -> dict[str, Any]:
    """Read every finished run under out_dir/runs and write summary.json and summary.csv; rows best-first."""
    out_dir = Path(out_dir)
    ablation = RunDir(out_dir).read_json_file("ablation.json")  # checked to be there by the caller
    steps = ablation["train"]["steps"]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    diverged: dict[tuple[str, int], int] = {}
    for path in sorted(p for p in (out_dir / "runs").glob("*") if (p / CONFIG).exists()):
        run = RunDir(path)
        config = run.read_config()  # one error line for a damaged run, never a traceback
        key = (config["model_config"]["residual"], config["model_config"]["layers"])
        summary = run.read_summary()
        if summary is not None and summary.get("steps") == steps:
            metrics = _point_metrics(summary)
            groups.setdefault(key, []).append({**metrics, "seed": config["train"]["seed"]})
        elif (run / DIVERGED).exists():
            diverged[key] = diverged.get(key, 0) + 1
            groups.setdefault(key, [])
    rows = []
    for (residual, layers), points in groups.items():
        row: dict[str, Any] = {"residual": residual, "layers": layers, "seeds": len(points),
                               "diverged": diverged.get((residual, layers), 0)}
        for metric in METRICS:
            for stat, value in _stats([p[metric] for p in points]).items():
                row[f"{metric}_{stat}"] = value
        rows.append(row)
    rows.sort(key=lambda r: (r["final_val_loss_mean"] is None, r["final_val_loss_mean"] or 0.0))
    result = {"model": ablation["model"], "steps": ablation["train"]["steps"], "rows": rows}
    write_json(out_dir / "summary.json", result)
    buffer = io.StringIO()
    stat_columns = [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "min", "max")]
    columns = ["residual", "layers", "seeds", "diverged", *stat_columns]
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write(out_dir / "summary.csv", buffer.getvalue().encode())
    return result


def summary_table(result: dict[str, Any]):
    """A rich Table of the summary, best scheme first, spread shown as +- std and [min, max]."""
    from rich.table import Table

    table = Table(title=f"{result['model']}, {result['steps']} steps: mean over seeds, +- std, \\[min, max]")
    for column in ("scheme", "depth", "seeds", "final val loss", "range", "best val", "grad share L0/Llast",
                   "stream RMS", "mean drift", "tok/s"):
        table.add_column(column, justify="left" if column == "scheme" else "right")

    def cell(row: dict[str, Any], metric: str, digits: int) -> str:
        mean = row[f"{metric}_mean"]
        return "-" if mean is None else f"{mean:.{digits}f}"

    for row in result["rows"]:
        spread = "" if row["seeds"] < 2 or row["final_val_loss_std"] is None else f" +- {row['final_val_loss_std']:.4f}"
        span = ("-" if row["final_val_loss_min"] is None
                else f"[{row['final_val_loss_min']:.4f}, {row['final_val_loss_max']:.4f}]")
        seeds = str(row["seeds"]) + (f" ({row['diverged']} diverged)" if row.get("diverged") else "")
        table.add_row(row["residual"], str(row["layers"]), seeds, cell(row, "final_val_loss", 4) + spread,
                      span, cell(row, "best_val_loss", 4), cell(row, "first_layer_grad_share", 3),
                      cell(row, "final_stream_rms", 2), cell(row, "mean_drift", 3),
                      cell(row, "tokens_per_second", 0))
    return table
