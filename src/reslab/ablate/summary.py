"""The ablation's summary on the console; the aggregation itself is `reslab.ablation_summary` (re-exported here)."""

from __future__ import annotations

from typing import Any

from reslab.ablation_summary import aggregated_keys, summarize
from reslab.metrics import seed_summaries
from reslab.stats import ALPHA, FEW_SEEDS, LEVEL

__all__ = ["aggregated_keys", "comparison_table", "few_seeds_warning", "summarize", "summary_table"]


def summary_table(result: dict[str, Any]):
    """A rich Table of the summary, best scheme first: the headline's mean and its 95% interval over seeds, then
    the mean of every other field aggregated over seeds."""
    from rich.table import Table

    headline, *others = seed_summaries()
    table = Table(title=f"{result['model']}, {result['steps']} steps: mean over seeds, {LEVEL:.0%} interval")
    for column in ("scheme", "depth", "seeds", headline.column, f"{LEVEL:.0%} interval", *(f.column for f in others)):
        table.add_column(column.replace("\n", " "), justify="left" if column == "scheme" else "right",
                         no_wrap="interval" in column)
    for row in result["rows"]:
        low, high = row.get(f"{headline.key}_ci_low"), row.get(f"{headline.key}_ci_high")
        span = "-" if low is None else f"[{low:.{headline.digits}f}, {high:.{headline.digits}f}]"
        seeds = str(row["seeds"]) + (f" ({row['diverged']} diverged)" if row.get("diverged") else "")
        table.add_row(row["residual"], str(row["layers"]), seeds, _mean(row, headline), span,
                      *(_mean(row, field) for field in others))
    return table


def comparison_table(result: dict[str, Any]):
    """A rich Table of each scheme against the baseline on the headline field, paired by seed, or None when there
    is nothing to compare."""
    from rich.table import Table

    headline = seed_summaries()[0]
    tests = [c for c in result.get("comparisons", []) if c["metric"] == headline.key]
    if not tests:
        return None
    table = Table(title=f"{headline.column.replace(chr(10), ' ')} against {result['baseline']}, paired by seed "
                        f"(Holm-corrected over the grid, alpha {ALPHA:g})")
    for column in ("scheme", "depth", "seeds", "difference", f"{LEVEL:.0%} interval", "p (Holm)", "verdict",
                   "seeds needed"):
        table.add_column(column, justify="left" if column in ("scheme", "verdict") else "right",
                         no_wrap="interval" in column)
    for test in tests:
        table.add_row(test["residual"], str(test["layers"]), str(test["n"]), _signed(test["diff"]),
                      "-" if test["low"] is None else f"[{test['low']:+.4f}, {test['high']:+.4f}]",
                      "-" if test["p_holm"] is None else f"{test['p_holm']:.3g}", test["verdict"],
                      "-" if test["seeds_needed"] is None else str(test["seeds_needed"]))
    return table


def few_seeds_warning(result: dict[str, Any]) -> str | None:
    """One line when some grid point has fewer than FEW_SEEDS seeds: its intervals are wide and its tests weak."""
    fewest = min((row["seeds"] for row in result["rows"]), default=0)
    if fewest >= FEW_SEEDS:
        return None
    return (f"warning: {fewest} seed(s) at some grid point: the {LEVEL:.0%} intervals are wide and a paired test "
            f"can rarely separate schemes; use --seeds with at least {FEW_SEEDS} (see 'seeds needed')")


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"


def _mean(row: dict[str, Any], field) -> str:
    mean = row.get(f"{field.key}_mean")
    return "-" if mean is None else f"{mean:.{field.digits}f}"
