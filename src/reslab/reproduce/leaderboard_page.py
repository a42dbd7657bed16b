"""The leaderboard's Markdown page: for each model and depth, every scheme ranked at equal steps and at equal wall
time, with its 95% interval and its paired test against `pre`; the forest and loss plots beside the page."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from reslab.ablationdir import AblationDir, parse_run_name
from reslab.io import atomic_write, finite_number
from reslab.rundir import RunDir

RANKINGS = (("final_val_loss", "equal steps: final val loss"),
            ("val_loss_at_matched_time", "equal wall time: val loss at the depth's matched training time"))
HEAD = ("| # | scheme | val loss | 95% interval | Δ vs pre | 95% interval of Δ | p (Holm) | verdict | seeds | "
        "parameters | ms / step | s to target |\n|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")


def _f(value: Any, digits: int = 3, signed: bool = False) -> str:
    if not finite_number(value):
        return "–"
    return f"{value:{'+' if signed else ''}.{digits}f}"


def _interval(low: Any, high: Any, signed: bool = False) -> str:
    if "–" in (_f(low), _f(high)):
        return "–"
    return f"[{_f(low, signed=signed)}, {_f(high, signed=signed)}]"


def parameter_counts(ablation: AblationDir) -> dict[tuple[str, int], int]:
    """Each grid point's parameter count, from the summary of the first of its seeds that finished (one pass over
    the runs)."""
    counts: dict[tuple[str, int], int] = {}
    for path in ablation.run_dirs():
        point = parse_run_name(path.name)
        if point is None or (point.residual, point.layers) in counts:
            continue
        summary = RunDir(path).read_summary()
        if summary is not None and summary.get("parameters") is not None:
            counts[(point.residual, point.layers)] = summary["parameters"]
    return counts


def _ms_per_step(row: dict[str, Any], tokens_per_step: int) -> float | None:
    speed = row.get("tokens_per_second_mean")
    return 1000 * tokens_per_step / speed if finite_number(speed) and speed > 0 else None


def _line(rank: int, row: dict[str, Any], key: str, test: dict[str, Any], baseline: str | None,
          parameters: int | None, ms: float | None) -> str:
    verdict = "baseline" if row["residual"] == baseline else test.get("verdict", "–")
    p = test.get("p_holm")
    seeds = f"{row['seeds']}" + (f" ({row['diverged']} diverged)" if row.get("diverged") else "")
    return (f"| {rank} | `{row['residual']}` | {_f(row.get(f'{key}_mean'))} | "
            f"{_interval(row.get(f'{key}_ci_low'), row.get(f'{key}_ci_high'))} | {_f(test.get('diff'), signed=True)} | "
            f"{_interval(test.get('low'), test.get('high'), signed=True)} | {'–' if p is None else f'{p:.2g}'} | "
            f"{verdict} | {seeds} | {'–' if parameters is None else f'{parameters:,}'} | {_f(ms, 1)} | "
            f"{_f(row.get('seconds_to_target_mean'), 1)} |")


def ranking(result: dict[str, Any], parameters: dict[tuple[str, int], int], layers: int, key: str,
            tokens_per_step: int) -> str:
    """One depth's table ranked by `key`'s mean over seeds, best first, with each scheme's test against pre."""
    rows = sorted((r for r in result["rows"] if r["layers"] == layers),
                  key=lambda r: (r.get(f"{key}_mean") is None, r.get(f"{key}_mean") or 0.0))
    tests = {t["residual"]: t for t in result.get("comparisons", []) if t["metric"] == key and t["layers"] == layers}
    lines = [_line(rank, row, key, tests.get(row["residual"], {}), result.get("baseline"),
                   parameters.get((row["residual"], layers)), _ms_per_step(row, tokens_per_step))
             for rank, row in enumerate(rows, 1)]
    return HEAD + "\n" + "\n".join(lines)


def _plots(result_dir: Path, plot_dir: Path, model: str) -> list[str]:
    """The forest plot and the loss curves of one model's grid, drawn into plot_dir; their file names."""
    import matplotlib

    from reslab.metrics import in_figure
    from reslab.report.load import load_ablation
    from reslab.report.plots import STYLE, plot_forest, plot_vs_step, scheme_colours

    ablation = load_ablation(result_dir)
    colours = scheme_colours(ablation.schemes)
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with matplotlib.rc_context(STYLE):
        for name, draw, metrics, title in (
                ("forest", plot_forest, [], f"{model}: final val loss minus pre's, paired by seed"),
                ("loss", plot_vs_step, in_figure("loss"), f"{model}: loss vs step")):
            if draw(ablation, plot_dir / f"{model}-{name}.png", colours, metrics, title):
                written.append(f"{model}-{name}.png")
    return written


def page(results: dict[str, dict[str, Any]], dirs: dict[str, Path], context: dict[str, Any],
         plot_dir: Path) -> str:
    grid, train = context["grid"], context["grid"]["train"]
    tokens = train["batch"] * grid["shape"]["context"]
    parts = [
        "# Residual scheme leaderboard", "",
        f"Written by `{context['command']}` on {_dt.date.today().isoformat()}, in "
        f"{max(1, round(context['wall_seconds'] / 60))} min of wall time (finished grid points reused), on: "
        f"{context['machine']}.", "",
        f"Every scheme of `reslab list`, at depths {', '.join(map(str, grid['layers']))}, seeds "
        f"{', '.join(map(str, grid['seeds']))}, on {train['data']} at width {grid['shape']['width']}, "
        f"{grid['shape']['heads']} heads, context {grid['shape']['context']}, batch {train['batch']}, "
        f"{train['steps']} steps, lr {train['lr']:g}, {train['dtype']}.", "",
        "**Held equal** in both rankings: steps, tokens (batch x context x steps), the data order and the "
        "initialisation seed of each seed. The *equal steps* ranking compares the final val loss; the *equal wall "
        "time* ranking compares each run's last evaluation at or before the shortest run's training time at that "
        "depth (evaluations every "
        f"{train['eval_interval']} steps), because multi-stream schemes cost more per step. Parameters differ between "
        "schemes (listed). The Δ is scheme minus `pre` on the same seeds, with a paired t-test Holm-corrected over "
        "the grid at alpha 0.05: *better*, *worse*, or *no difference at this n*. Timings were taken with grid "
        "points running in parallel on a shared machine: compare them within one table, not across machines.", "",
        f"Reproduce: `{context['command']}` (resumable: the grids are under `{context['out']}`).", ""]
    for model, result in results.items():
        parameters = parameter_counts(AblationDir(dirs[model]))
        for layers in grid["layers"]:
            for key, title in RANKINGS:
                heading = f"## {model}, {layers} block{'s' if layers != 1 else ''}: {title}"
                parts += [heading, "", ranking(result, parameters, layers, key, tokens), ""]
        for name in _plots(dirs[model], plot_dir, model):
            parts += [f"![{name}]({plot_dir.name}/{name})", ""]
    return "\n".join(parts)


def write_page(path: Path, results: dict[str, dict[str, Any]], dirs: dict[str, Path], context: dict[str, Any]) -> None:
    """The page at `path`, its plots in a folder beside it named after it (docs/leaderboard.md: docs/leaderboard/)."""
    plot_dir = path.parent / path.stem
    atomic_write(path, page(results, dirs, context, plot_dir).encode("utf-8"))
