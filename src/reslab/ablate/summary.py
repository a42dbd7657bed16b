"""The ablation's summary on the console: the tables of `reslab.ablation_summary.AblationSummary` (the same columns a
notebook shows) drawn with rich; the aggregation itself is `reslab.ablation_summary` (re-exported here)."""

from __future__ import annotations

from typing import Any

from reslab.ablation_summary import INTERVAL, AblationSummary, aggregated_keys, few_seeds_warning, summarize
from reslab.metrics import seed_summaries
from reslab.stats import ALPHA, LEVEL

__all__ = ["aggregated_keys", "comparison_table", "few_seeds_warning", "summarize", "summary_table"]


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        return f"[{value[0]:{spec}}, {value[1]:{spec}}]"
    return f"{value:{spec}}" if isinstance(value, float) else str(value)


def _table(title: str, columns: dict[str, list[Any]], specs: dict[str, str], left: tuple[str, ...]):
    from rich.table import Table

    table = Table(title=title)
    for name in columns:
        table.add_column(name, justify="left" if name in left else "right", no_wrap=name == INTERVAL)
    for row in zip(*columns.values()):
        table.add_row(*(_cell(value, specs.get(name, "")) for name, value in zip(columns, row)))
    return table


def summary_table(result: dict[str, Any]):
    """A rich Table of the summary, best scheme first: the headline's mean and its 95% interval over seeds, then
    the mean of every other field aggregated over seeds."""
    headline = seed_summaries()[0]
    columns = AblationSummary(result).columns()
    columns["seeds"] = [str(r["seeds"]) + (f" ({r['diverged']} diverged)" if r.get("diverged") else "")
                        for r in result["rows"]]
    specs = {f.column.replace("\n", " "): f".{f.digits}f" for f in seed_summaries()}
    return _table(f"{result['model']}, {result['steps']} steps: mean over seeds, {LEVEL:.0%} interval", columns,
                  {**specs, INTERVAL: f".{headline.digits}f"}, ("scheme",))


def comparison_table(result: dict[str, Any]):
    """A rich Table of each scheme against the baseline on the headline field, paired by seed, or None when there
    is nothing to compare."""
    columns = AblationSummary(result).comparison_columns()
    if not columns["scheme"]:
        return None
    headline = seed_summaries()[0].column.replace("\n", " ")
    return _table(f"{headline} against {result['baseline']}, paired by seed (Holm-corrected over the grid, "
                  f"alpha {ALPHA:g})", columns, {"difference": "+.4f", INTERVAL: "+.4f", "p (Holm)": ".3g"},
                  ("scheme", "verdict"))


