"""The ablation's summary on the console; the aggregation itself is `reslab.ablation_summary` (re-exported here)."""

from __future__ import annotations

from typing import Any

from reslab.ablation_summary import aggregated_keys, summarize
from reslab.metrics import seed_summaries

__all__ = ["aggregated_keys", "summarize", "summary_table"]


def summary_table(result: dict[str, Any]):
    """A rich Table of the summary, best scheme first: the headline's mean +- std and [min, max], then the mean of
    every other field aggregated over seeds."""
    from rich.table import Table

    headline, *others = seed_summaries()
    table = Table(title=f"{result['model']}, {result['steps']} steps: mean over seeds, +- std, \\[min, max]")
    for column in ("scheme", "depth", "seeds", headline.column, "range", *(f.column for f in others)):
        table.add_column(column.replace("\n", " "), justify="left" if column == "scheme" else "right")
    for row in result["rows"]:
        std, low, high = (row[f"{headline.key}_{stat}"] for stat in ("std", "min", "max"))
        spread = "" if row["seeds"] < 2 or std is None else f" +- {std:.{headline.digits}f}"
        span = "-" if low is None else f"[{low:.{headline.digits}f}, {high:.{headline.digits}f}]"
        seeds = str(row["seeds"]) + (f" ({row['diverged']} diverged)" if row.get("diverged") else "")
        table.add_row(row["residual"], str(row["layers"]), seeds, _mean(row, headline) + spread, span,
                      *(_mean(row, field) for field in others))
    return table


def _mean(row: dict[str, Any], field) -> str:
    mean = row.get(f"{field.key}_mean")
    return "-" if mean is None else f"{mean:.{field.digits}f}"
