"""Aggregate an ablation directory: per (scheme, depth), the mean, spread and 95% interval over seeds of each summary
field that a metric's declaration aggregates over seeds (`reslab.metrics`), of the val loss at a matched wall time
and of the time to a target loss; then every scheme against a baseline, paired by seed (`reslab.stats`).

Below both the ablation (which aggregates when its grid is done) and the report (which aggregates again from the
runs on disk), so neither imports the other for it."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from reslab.ablationdir import COMPARISONS_CSV, SUMMARY, SUMMARY_CSV, AblationDir
from reslab.display import data_frame, html_block, html_table
from reslab.errors import ReslabError
from reslab.io import atomic_write, finite_number, write_json
from reslab.metrics import SEED_STATS, point_values, seed_stats, seed_summaries
from reslab.rundir import CONFIG, DIVERGED, TIMING_KEYS, DamagedRunError, RunDir
from reslab.stats import ALPHA, FEW_SEEDS, LEVEL, adjust, compare

DEFAULT_BASELINE = "pre"
# per depth: each run's last val loss at or before the shortest run's training time (the matched wall time), and
# its training seconds to the first val loss at or below the target loss
AT_MATCHED_TIME = "val_loss_at_matched_time"
TIME_TO_TARGET = "seconds_to_target"
DERIVED = (AT_MATCHED_TIME, TIME_TO_TARGET)
# the summary columns that depend on the wall clock (two equal grids differ in them): the timing metrics' fields, the
# matched time, and the two fields read at it or measured in seconds
TIMING_COLUMNS = (*TIMING_KEYS, "matched_seconds", *DERIVED)
HELD_EQUAL = ("steps", "tokens (batch x context x steps)", "init seed and data order per seed")


def aggregated_keys() -> list[str]:
    """The fields aggregated over seeds, headline first (columns `<key>_mean`, `_std`, `_ci_low`, ...): each
    metric's declared seed summaries, then the two the grid derives from the runs' curves."""
    return [field.key for field in seed_summaries()] + list(DERIVED)


def compared_keys() -> list[str]:
    """The fields each scheme is compared on against the baseline: the declared val-loss summaries and both
    derived fields (lower is better for each)."""
    return [f.key for f in seed_summaries() if f.key.endswith("val_loss")] + list(DERIVED)


@dataclass
class Point:
    """One (scheme, depth): each finished seed's values and val-loss curve, and how many seeds diverged."""

    residual: str
    layers: int
    runs: dict[int, dict[str, Any]] = field(default_factory=dict)  # seed -> values
    curves: dict[int, list[tuple[float, float]]] = field(default_factory=dict)  # seed -> [(seconds, val loss)]
    diverged: int = 0


def _points(ablation: AblationDir, steps: int) -> dict[tuple[str, int], Point]:
    points: dict[tuple[str, int], Point] = {}
    for path in (p for p in ablation.run_dirs() if (p / CONFIG).exists()):
        run = RunDir(path)
        config = run.read_config()  # one error line for a damaged run, never a traceback
        key = (config["model_config"]["residual"], config["model_config"]["layers"])
        point = points.setdefault(key, Point(*key))
        summary = run.read_summary()
        if summary is not None and summary.get("steps") == steps:
            seed = config["train"].get("seed")
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise DamagedRunError(f"{path / CONFIG}: train.seed is not an integer; restore the file from a copy")
            point.runs[seed] = point_values(summary)
            point.curves[seed] = [(r["train_seconds"], r["val_loss"]) for r in run.read_metrics()
                                  if finite_number(r.get("val_loss")) and finite_number(r.get("train_seconds"))]
        elif (run / DIVERGED).exists():
            point.diverged += 1
    return points


def _budgets(points: dict[tuple[str, int], Point], target: float | None) -> dict[int, tuple[float, float]]:
    """Per depth, the matched wall time (the shortest run's training time at that depth) and the target loss (given,
    else the highest final val loss of any run at that depth, so that every run reaches it)."""
    ends: dict[int, list[tuple[float, float]]] = {}
    for point in points.values():
        ends.setdefault(point.layers, []).extend(curve[-1] for curve in point.curves.values() if curve)
    return {layers: (min(t for t, _ in got), target if target is not None else max(loss for _, loss in got))
            for layers, got in ends.items() if got}


def _derive(point: Point, budget: tuple[float, float] | None) -> None:
    """Each run's val loss at the matched time and its time to the target loss (None where not reached)."""
    matched, target = budget if budget is not None else (None, None)
    for seed, curve in point.curves.items():
        before = [loss for t, loss in curve if matched is not None and t <= matched]
        reached = [t for t, loss in curve if target is not None and loss <= target]
        point.runs[seed][AT_MATCHED_TIME] = before[-1] if before else None
        point.runs[seed][TIME_TO_TARGET] = reached[0] if reached else None


def _row(point: Point, keys: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"residual": point.residual, "layers": point.layers, "seeds": len(point.runs),
                           "diverged": point.diverged}
    for key in keys:
        for stat, value in seed_stats([values.get(key) for values in point.runs.values()]).items():
            row[f"{key}_{stat}"] = value
    return row


def choose_baseline(residuals: list[str], baseline: str | None) -> str | None:
    """The scheme every other is compared with: the one asked for, else `pre` when in the grid, else the first."""
    if baseline is not None:
        if baseline not in residuals:
            raise ReslabError(f"--baseline {baseline} is not a scheme of this grid ({', '.join(residuals)}); "
                              "choose one of them")
        return baseline
    return DEFAULT_BASELINE if DEFAULT_BASELINE in residuals else (residuals[0] if residuals else None)


def comparisons(points: dict[tuple[str, int], Point], baseline: str | None) -> list[dict[str, Any]]:
    """Every (scheme, depth) other than the baseline against the baseline at the same depth, paired by seed, on each
    compared field; Holm-corrected over the grid, one family per field."""
    result = []
    for key in compared_keys():
        pairs = [(point, points.get((baseline, point.layers))) for point in points.values()
                 if point.residual != baseline]
        tested = adjust([replace(compare({s: v.get(key) for s, v in point.runs.items()},
                                         {s: v.get(key) for s, v in base.runs.items()} if base else {}),
                                 paired=len(point.runs.keys() & base.runs.keys()) if base else 0)
                         for point, base in pairs])
        result += [{"residual": point.residual, "layers": point.layers, "baseline": baseline, "metric": key,
                    **test.to_dict()} for (point, _), test in zip(pairs, tested)]
    return result


def summarize(out_dir: Path, baseline: str | None = None, target_loss: float | None = None) -> dict[str, Any]:
    """Read every finished run under out_dir/runs and write summary.json, summary.csv and comparisons.csv; rows
    best-first. `baseline` (default: the ablation's recorded one, else `pre`, else the grid's first scheme)."""
    ablation = AblationDir(out_dir)
    record = ablation.read_record()  # checked to be there by the caller
    points = _points(ablation, record["train"]["steps"])
    budgets = _budgets(points, target_loss if target_loss is not None else _recorded_target(record))
    for point in points.values():
        _derive(point, budgets.get(point.layers))
    keys = aggregated_keys()
    rows = [{**_row(point, keys), **dict(zip(("matched_seconds", "target_loss"), budgets.get(point.layers, ())))}
            for point in points.values()]
    headline = f"{keys[0]}_mean"
    rows.sort(key=lambda r: (r[headline] is None, r[headline] or 0.0))
    grid = record.get("grid") if isinstance(record.get("grid"), dict) else {}
    listed = grid.get("residual") if isinstance(grid.get("residual"), list) else []
    residuals = list(dict.fromkeys([*listed, *(r["residual"] for r in rows)]))
    recorded = record.get("baseline") if record.get("baseline") in residuals else None
    chosen = choose_baseline(residuals, baseline or recorded)
    tests = comparisons(points, chosen)
    result = {"model": record["model"], "steps": record["train"]["steps"], "rows": rows, "baseline": chosen,
              "held_equal": list(HELD_EQUAL),
              "few_seeds": fewest_seeds(rows) < FEW_SEEDS, "comparisons": tests}
    write_json(ablation / SUMMARY, result)
    _write_csv(ablation / SUMMARY_CSV, rows, ["residual", "layers", "seeds", "diverged", "matched_seconds",
                                              "target_loss", *(f"{k}_{s}" for k in keys for s in SEED_STATS)])
    _write_csv(ablation / COMPARISONS_CSV, tests, list(tests[0]) if tests else ["residual"])
    return result


def _recorded_target(record: dict[str, Any]) -> float | None:
    target = record.get("target_loss")
    return float(target) if isinstance(target, (int, float)) and not isinstance(target, bool) else None


def fewest_seeds(rows: list[dict[str, Any]]) -> int:
    """The fewest seeds any grid point finished (0 for none)."""
    return min((row.get("seeds", 0) for row in rows), default=0)


def few_seeds_warning(rows: list[dict[str, Any]]) -> str | None:
    """One line when some grid point has fewer than FEW_SEEDS seeds: its intervals are wide and its tests weak."""
    fewest = fewest_seeds(rows)
    if fewest >= FEW_SEEDS:
        return None
    return (f"warning: {fewest} seed(s) at some grid point: the {LEVEL:.0%} intervals are wide and a paired test "
            f"can rarely separate schemes; use --seeds with at least {FEW_SEEDS} (see 'seeds needed')")


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write(path, buffer.getvalue().encode())


# --- in a notebook: summary.json as the tables `reslab ablate` prints ----------------------------------------------

@dataclass(repr=False)
class AblationSummary:
    """An ablation's summary (what `summarize` returns and writes as summary.json), shown in a notebook as the
    tables `reslab ablate` prints: `columns()` (best scheme first) and `comparison_columns()` (against the
    baseline), with the CLI's column names. Indexing reads the summary itself (`summary["rows"]`)."""

    record: dict[str, Any]
    path: Path | None = None

    def __getitem__(self, key: str) -> Any:
        return self.record[key]

    def columns(self) -> dict[str, list[Any]]:
        """scheme, depth, seeds, the headline field's mean, its 95% interval (low, high), every other field's mean."""
        headline, *others = seed_summaries()
        rows = self.record["rows"]
        interval = [None if r.get(f"{headline.key}_ci_low") is None else
                    (r[f"{headline.key}_ci_low"], r[f"{headline.key}_ci_high"]) for r in rows]
        table = {"scheme": [r["residual"] for r in rows], "depth": [r["layers"] for r in rows],
                 "seeds": [r["seeds"] for r in rows], _title(headline): [r.get(f"{headline.key}_mean") for r in rows],
                 INTERVAL: interval}
        table.update({_title(f): [r.get(f"{f.key}_mean") for r in rows] for f in others})
        return table

    def comparison_columns(self) -> dict[str, list[Any]]:
        """Each scheme against the baseline on the headline field, paired by seed."""
        key = seed_summaries()[0].key
        tests = [c for c in self.record.get("comparisons", []) if c["metric"] == key]
        return {"scheme": [t["residual"] for t in tests], "depth": [t["layers"] for t in tests],
                "seeds": [t["n"] for t in tests], "difference": [t["diff"] for t in tests],
                INTERVAL: [None if t["low"] is None else (t["low"], t["high"]) for t in tests],
                "p (Holm)": [t["p_holm"] for t in tests], "verdict": [t["verdict"] for t in tests],
                "seeds needed": [t["seeds_needed"] for t in tests]}

    def to_pandas(self, comparisons: bool = False):
        """The summary table (or, with `comparisons`, the comparison table) as a pandas DataFrame."""
        return data_frame(self.comparison_columns() if comparisons else self.columns())

    def _repr_html_(self) -> str:
        headline = seed_summaries()[0]
        shown = self.columns()
        shown["seeds"] = [str(r["seeds"]) + (f" ({r['diverged']} diverged)" if r.get("diverged") else "")
                          for r in self.record["rows"]]
        digits = {_title(f): f".{f.digits}f" for f in seed_summaries()}
        summary = html_table(shown, f"{self.record['model']}, {self.record['steps']} steps: mean over seeds, "
                             f"{LEVEL:.0%} interval", {**digits, INTERVAL: _interval(f".{headline.digits}f")})
        tests = self.comparison_columns()
        against = html_table(tests, f"{_title(headline)} against {self.record['baseline']}, paired by seed "
                             f"(Holm-corrected over the grid, alpha {ALPHA:g})",
                             {"difference": "+.4f", INTERVAL: _interval("+.4f"), "p (Holm)": ".3g"})
        warning = few_seeds_warning(self.record["rows"])
        return html_block(summary, against if tests["scheme"] else "", notes=[warning] if warning else [])

    def __repr__(self) -> str:
        rows = self.record["rows"]
        best = f"; best {rows[0]['residual']} L{rows[0]['layers']}" if rows else ""
        return (f"AblationSummary({self.record['model']}, {self.record['steps']} steps, {len(rows)} grid points"
                f"{best}; baseline {self.record['baseline']})")


INTERVAL = f"{LEVEL:.0%} interval"


def _title(summary) -> str:
    return summary.column.replace("\n", " ")


def _interval(spec: str):
    return lambda pair: "-" if pair is None else f"[{pair[0]:{spec}}, {pair[1]:{spec}}]"


def load_ablation(path: Path | str) -> AblationSummary:
    """The summary of the ablation directory `path` (its summary.json, written by `reslab ablate` and `reslab
    report`), for a notebook."""
    ablation = AblationDir(path).check()
    record = RunDir(ablation.path).read_json_file(SUMMARY)
    if not isinstance(record, dict) or not isinstance(record.get("rows"), list):
        raise ReslabError(f"{ablation / SUMMARY} is missing or holds no summary; write it with: reslab report {path}")
    return AblationSummary(record, ablation.path)
