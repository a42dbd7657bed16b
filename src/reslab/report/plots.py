"""The ablation's plots, as PNG files under DIR/plots/ (matplotlib, Agg; no pyplot, so no global state).

    loss.png      validation (and training) loss vs step per scheme: mean over seeds, min-max band; panel per depth
    grads.png     gradient norm of each block vs step: one panel per scheme and depth, colour = block
    profile.png   stream RMS, drift and update ratio per block at the end of training, a line per scheme
    amax.png      HC/mHC Amax gain vs step (only when some run logged `amax_gain_*`)
    connection_sums.png  row and column sums of H_res, sums of H_pre and H_post vs step (multi-stream schemes only)
    depth_weights.png  the depth-weight matrix a dense connection learned (DenseFormer's DWA), per scheme and depth
    NAME.png      a declared metric plotted in a figure of its own (`reslab.metrics.Plotted`): value vs step

Which metric goes into which figure, with what label, is its declaration's (`reslab.metrics`). Every scheme has one
colour in every plot (`scheme_colour`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reslab.ablationdir import PLOTS
from reslab.io import finite_number
from reslab.metrics import NATS, PER_SUBLAYER, SCALAR, Metric, figures, in_figure
from reslab.report.load import Ablation, Run
from reslab.stats import interval

# Fixed colours for the registered schemes, so a scheme looks the same in every report; the control is grey.
SCHEME_COLOURS = {
    "pre": "#1f77b4",
    "post": "#ff7f0e",
    "none": "#5f5f5f",
    "sandwich": "#2ca02c",
    "rezero": "#9467bd",
    "layerscale": "#17becf",
    "deepnorm": "#d62728",
    "add": "#e377c2",
    "article-edit": "#bcbd22",
    "post-none": "#8c564b",
    "hc": "#393b79",
    "mhc": "#637939",
}
_SPARE_COLOURS = ("#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#8c6d31", "#636363",
                  "#ad494a", "#a55194", "#6baed6", "#fd8d3c")

STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "legend.fontsize": 9,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}
DPI = 110


@dataclass
class Plot:
    name: str  # file name under plots/
    path: Path
    title: str
    caption: str


def scheme_colours(schemes: Sequence[str]) -> dict[str, str]:
    """A colour per scheme: the fixed one for known schemes, spare colours in order for the others."""
    colours, spare = {}, [c for c in _SPARE_COLOURS]
    for name in schemes:
        colours[name] = SCHEME_COLOURS.get(name) or (spare.pop(0) if spare else "#000000")
    return colours


def aggregate(runs: Sequence[Run], get: Callable[[dict[str, Any]], Any]) -> tuple[list[int], list[float], list[float],
                                                                                     list[float]]:
    """Per step over the seeds: (steps, mean, low, high) of get(record), low and high the 95% Student-t interval of
    the mean (the mean itself where one seed has a value); steps where no seed has a value are left out."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for record in run.records:
            value = get(record)
            if finite_number(value):
                by_step.setdefault(record["step"], []).append(float(value))
    steps = sorted(by_step)
    spreads = [interval(by_step[s]) for s in steps]
    return (steps, [i.mean for i in spreads], [i.mean if i.low is None else i.low for i in spreads],
            [i.mean if i.high is None else i.high for i in spreads])


def _index(values: Any, *path: int) -> Any:
    try:
        for i in path:
            values = values[i]
        return values
    except (IndexError, KeyError, TypeError):
        return None


def _block_profile(runs: Sequence[Run], key: str, sub: int | None = None) -> tuple[list[int], list[float], list[float],
                                                                                     list[float]]:
    """Per block over seeds, at each run's last record with `key`: (blocks, mean, min, max).

    Finished runs are used when the group has any; otherwise the last logged step of the others."""
    finished = [r for r in runs if r.status == "finished"]
    values: dict[int, list[float]] = {}
    for run in finished or runs:
        record = run.last_with(key)
        if record is None or not isinstance(record[key], list):
            continue
        for block, item in enumerate(record[key]):
            value = _index(item, sub) if sub is not None else item
            if finite_number(value):
                values.setdefault(block, []).append(float(value))
    blocks = sorted(values)
    return (blocks, [sum(values[b]) / len(values[b]) for b in blocks], [min(values[b]) for b in blocks],
            [max(values[b]) for b in blocks])


def _log_y(ax) -> None:
    """A log y-axis where the data span a decade or more, else linear (a log axis over 1.0-1.1 shows one label).

    No minor ticks (they cost half the layout time); under 1.5 decades, ticks at 1, 2, 5 x 10^k."""
    from matplotlib.ticker import AutoLocator, FormatStrFormatter, LogLocator, NullLocator, ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(NullLocator())
    low, high = ax.get_ylim()
    decades = math.log10(high / low) if low > 0 else math.inf
    if decades < 1.0:
        ax.set_yscale("linear")
        ax.yaxis.set_major_locator(AutoLocator())
        ax.yaxis.set_major_formatter(ScalarFormatter())
    elif decades < 1.5:
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))


def _no_data(ax, text: str = "not recorded") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#888888", fontsize=10)
    # tick_params, not set_yticks([]): the latter would also empty every axis that shares this one's y-axis
    ax.tick_params(left=False, labelleft=False, bottom=False, labelbottom=False)
    ax.grid(False)


def _save(figure, path: Path) -> None:
    from reslab.io import atomic_write

    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))


def _figure(ncols: int, nrows: int, panel: tuple[float, float], **kwargs):
    from matplotlib.figure import Figure

    width = max(min(panel[0] * ncols, 17.0), 7.0)  # one panel alone still reads as a figure
    figure = Figure(figsize=(width + 0.6, panel[1] * nrows + 1.0), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False, **kwargs)
    return figure, axes


def _scheme_legend(figure, ablation: Ablation, colours: dict[str, str], extra: Sequence = (),
                   schemes: Sequence[str] | None = None) -> None:
    from matplotlib.lines import Line2D

    shown = ablation.schemes if schemes is None else schemes
    handles = [Line2D([], [], color=colours[s], lw=2.5, label=s) for s in shown] + list(extra)
    entry = max(len(h.get_label()) for h in handles) * 0.085 + 0.6  # inches per legend column at fontsize 10
    columns = max(1, min(len(handles), int(figure.get_figwidth() / entry)))  # as many as fit the figure's width
    figure.legend(handles=handles, loc="outside lower center", ncols=columns, fontsize=10)


def _seed_note(ablation: Ablation) -> str:
    seeds = len(ablation.seeds)
    if seeds == 1:
        return "one seed"
    wide = ", wide at 2 seeds" if seeds == 2 else ""
    return f"line: mean over {seeds} seeds, band: its 95% interval{wide}"


def plot_vs_step(ablation: Ablation, path: Path, colours: dict[str, str], metrics: list[Metric], title: str) -> bool:
    """Each scalar metric vs step, a row per metric (e.g. validation loss, then training loss), a column per depth."""
    from matplotlib.lines import Line2D

    depths = ablation.depths
    rows = [m for m in metrics if m.shape == SCALAR and any(run.series(m.name)[0] for run in ablation.runs)]
    if not rows or not depths:
        return False
    figure, axes = _figure(len(depths), len(rows), (4.6, 3.3), sharex="col", sharey="row")
    cap = math.log(ablation.vocab_size) * 1.25 if ablation.vocab_size else None
    any_diverged = False
    for row, metric in enumerate(rows):
        key, top = metric.name, -math.inf
        for col, depth in enumerate(depths):
            ax = axes[row][col]
            drawn = False
            for scheme in ablation.schemes:
                runs = ablation.runs_for(scheme, depth)
                steps, mean, lo, hi = aggregate(runs, lambda r, k=key: r.get(k))
                if not steps:
                    continue
                drawn = True
                colour = colours[scheme]
                ax.plot(steps, mean, color=colour, lw=2, marker="o" if len(steps) <= 12 else None, ms=3.5)
                if len(runs) > 1:
                    ax.fill_between(steps, lo, hi, color=colour, alpha=0.18, lw=0)
                top = max(top, max(hi))
                for run in runs:
                    if run.status == "diverged":
                        run_steps, values = run.series(key)
                        if run_steps:
                            any_diverged = True
                            ax.plot(run_steps[-1], values[-1], marker="X", ms=10, color=colour, mec="black", mew=0.8)
            if not drawn:
                _no_data(ax)
                continue
            if row == 0:
                ax.set_title(f"{depth} block{'s' if depth != 1 else ''}")
            if row == len(rows) - 1:
                ax.set_xlabel("training step")
            if col == 0:
                ax.set_ylabel(f"{metric.plot.label}\n({metric.unit})" if metric.unit else metric.plot.label)
        if cap is not None and metric.unit == NATS and top > cap:  # a diverging run must not flatten the others
            axes[row][0].set_ylim(top=cap)
    extra = [Line2D([], [], ls="none", marker="X", ms=9, color="white", mec="black", label="diverged here")] \
        if any_diverged else []
    _scheme_legend(figure, ablation, colours, extra)
    figure.suptitle(f"{title} ({_seed_note(ablation)})", fontsize=12, fontweight="bold")
    _save(figure, path)
    return True


def plot_grads(ablation: Ablation, path: Path, colours: dict[str, str], metrics: list[Metric], title: str) -> bool:
    """A per-block metric (the gradient norm of each block) vs step: a panel per (depth, scheme), blocks coloured
    bottom (dark) to top."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm

    metric = next((m for m in metrics if any(run.last_with(m.name) for run in ablation.runs)), None)
    if metric is None:
        return False
    schemes, depths = ablation.schemes, ablation.depths
    ncols = min(len(schemes), 4)
    rows_per_depth = math.ceil(len(schemes) / ncols)
    figure, axes = _figure(ncols, rows_per_depth * len(depths), (4.0, 2.9), sharey=True)
    cmap = colormaps["viridis"]
    drawn_axes = []
    for d, depth in enumerate(depths):
        group = []
        norm = BoundaryNorm([b - 0.5 for b in range(depth + 1)], cmap.N)
        for i, scheme in enumerate(schemes):
            ax = axes[d * rows_per_depth + i // ncols][i % ncols]
            group.append(ax)
            runs = ablation.runs_for(scheme, depth)
            drawn = False
            for block in range(depth):
                steps, mean, _, _ = aggregate(runs, lambda r, b=block: _index(r.get(metric.name), b))
                points = [(s, m) for s, m in zip(steps, mean) if m > 0]
                if points:
                    drawn = True
                    ax.plot(*zip(*points), color=cmap(norm(block)), lw=1.6)
            title = ax.set_title(f"{scheme}  ·  {depth} block{'s' if depth != 1 else ''}", color=colours[scheme])
            title.set_fontweight("bold")
            if not drawn:
                _no_data(ax)
                continue
            drawn_axes.append(ax)
            _log_y(ax)
            if i // ncols == rows_per_depth - 1 or i + ncols >= len(schemes):
                ax.set_xlabel("training step")
            if i % ncols == 0:
                ax.set_ylabel(metric.unit)
        for j in range(len(schemes), rows_per_depth * ncols):  # unused panels in the depth's last row
            axes[d * rows_per_depth + j // ncols][j % ncols].set_visible(False)
        for ax in drawn_axes:  # again, now that the shared y-range holds every panel's data
            _log_y(ax)
        bar = figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=group, shrink=0.9, pad=0.01,
                              ticks=range(depth) if depth <= 16 else None)
        bar.set_label("block (0 = next to the embedding)")
    figure.suptitle(f"{title} (mean over {len(ablation.seeds)} "
                    f"seed{'s' if len(ablation.seeds) != 1 else ''}, before clipping)", fontsize=12, fontweight="bold")
    _save(figure, path)
    return True


def plot_profile(ablation: Ablation, path: Path, colours: dict[str, str], metrics: list[Metric], title: str) -> bool:
    """Per block at the end of training (stream RMS, drift, update ratio): a panel per metric, a line per scheme,
    a row per depth."""
    from matplotlib.lines import Line2D

    if not any(run.last_with(m.name) for m in metrics if m.shape != PER_SUBLAYER for run in ablation.runs):
        return False
    panels = [(m.name, m.unit, m.plot.label, m.plot.log, m.shape == PER_SUBLAYER) for m in metrics]
    depths = ablation.depths
    figure, axes = _figure(len(panels), len(depths), (4.6, 3.1))
    for row, depth in enumerate(depths):
        for col, (key, unit, label, log, per_sublayer) in enumerate(panels):
            ax = axes[row][col]
            drawn = False
            for scheme in ablation.schemes:
                runs = ablation.runs_for(scheme, depth)
                parts = [(0, "-"), (1, "--")] if per_sublayer else [(None, "-")]
                for sub, style in parts:
                    blocks, mean, lo, hi = _block_profile(runs, key, sub)
                    if log:
                        keep = [i for i, m in enumerate(mean) if m > 0]
                        blocks, mean = [blocks[i] for i in keep], [mean[i] for i in keep]
                        lo, hi = [max(lo[i], 1e-12) for i in keep], [hi[i] for i in keep]
                    if not blocks:
                        continue
                    drawn = True
                    ax.plot(blocks, mean, color=colours[scheme], lw=2, ls=style, marker="o", ms=4)
                    if len(runs) > 1:
                        ax.fill_between(blocks, lo, hi, color=colours[scheme], alpha=0.15, lw=0)
            ax.set_title(f"{label}  ·  {depth} block{'s' if depth != 1 else ''}", fontsize=10)
            if not drawn:
                _no_data(ax)
                continue
            if log:
                _log_y(ax)
            ax.set_ylabel(unit)
            if unit == "cosine similarity":
                ax.axhline(1.0, color="#999999", lw=0.8, ls=":")
                ax.axhline(0.0, color="#999999", lw=0.8, ls=":")
            ax.set_xticks(range(depth) if depth <= 16 else range(0, depth, max(1, depth // 8)))
            ax.set_xlim(-0.3, depth - 0.7)
            if row == len(depths) - 1:
                ax.set_xlabel("block (0 = next to the embedding)")
    extra = [Line2D([], [], color="#444444", lw=2, ls="-", label="attention (update ratio)"),
             Line2D([], [], color="#444444", lw=2, ls="--", label="FFN (update ratio)")]
    _scheme_legend(figure, ablation, colours, extra)
    figure.suptitle(f"{title} ({_seed_note(ablation)})", fontsize=12, fontweight="bold")
    _save(figure, path)
    return True


def plot_panels(ablation: Ablation, path: Path, colours: dict[str, str], metrics: list[Metric], title: str) -> bool:
    """Scalar metrics only some schemes log, vs step: a panel per metric some run recorded and per depth, a line per
    scheme that logged it (mean over seeds, band: the 95% interval). Each panel as its metric is declared
    (`Plotted`): a log y-axis for `log` (values <= 0 left out), a dotted line at `reference`, the unit as y label.
    Draws the Amax gain (`amax`) and the connection-weight sums (`connection_sums`)."""
    shown = [m for m in metrics if any(finite_number(r.get(m.name)) for run in ablation.runs for r in run.records)]
    if not shown:
        return False
    keys = {m.name for m in shown}
    with_data = [s for s in ablation.schemes
                 if any(k in r for run in ablation.runs if run.residual == s for r in run.records for k in keys)]
    depths = ablation.depths
    figure, axes = _figure(len(shown), len(depths), (4.6, 3.1), sharex=True)
    for row, depth in enumerate(depths):
        for col, metric in enumerate(shown):
            ax = axes[row][col]
            if not _scheme_lines(ax, ablation, colours, metric, depth):
                _no_data(ax)
            ax.set_title(f"{metric.plot.label}  ·  {depth} block{'s' if depth != 1 else ''}", fontsize=10)
            if col == 0 or metric.unit != shown[col - 1].unit:
                ax.set_ylabel(metric.unit)
            if row == len(depths) - 1:
                ax.set_xlabel("training step")
    _scheme_legend(figure, ablation, colours, schemes=with_data)
    figure.suptitle(f"{title} ({_seed_note(ablation)})", fontsize=12, fontweight="bold")
    _save(figure, path)
    return True


def _scheme_lines(ax, ablation: Ablation, colours: dict[str, str], metric: Metric, depth: int) -> bool:
    """One panel of `plot_panels`: each scheme's line of `metric` at `depth`; False when none has a value."""
    drawn = False
    for scheme in ablation.schemes:
        runs = ablation.runs_for(scheme, depth)
        steps, mean, lo, hi = aggregate(runs, lambda r, k=metric.name: r.get(k))
        points = [p for p in zip(steps, mean, lo, hi) if not metric.plot.log or (p[1] > 0 and p[2] > 0)]
        if not points:
            continue
        drawn = True
        steps, mean, lo, hi = (list(v) for v in zip(*points))
        ax.plot(steps, mean, color=colours[scheme], lw=2, marker="o" if len(steps) <= 12 else None, ms=3.5)
        if len(runs) > 1:
            ax.fill_between(steps, lo, hi, color=colours[scheme], alpha=0.18, lw=0)
    if drawn and metric.plot.reference is not None:
        ax.axhline(metric.plot.reference, color="#999999", lw=0.8, ls=":")
    if drawn and metric.plot.log:
        _log_y(ax)
    return drawn


def _figures(seeds: str) -> dict[str, tuple[Callable[..., bool], str, str]]:
    """The built-in figures: name -> (draw, title, caption); `draw` is given the metrics declared in the figure."""
    return {
        "loss": (plot_vs_step, "Loss vs step", (
                 f"Validation loss (top; the same held-out batches at every evaluation) and training loss (bottom; "
                 f"mean over each log window) per scheme, one column per depth ({seeds}). Lower is better.")),
        "grads": (plot_grads, "Gradient norm per block vs step", (
                  "L2 norm of all gradients inside each block, before clipping, on log steps; colour runs from block "
                  "0 (dark, next to the embedding) to the last block (yellow, next to the head). One y-axis for all "
                  "panels, logarithmic when the norms span a decade or more: lines far apart mean some blocks get "
                  "much less training signal than others.")),
        "profile": (plot_profile, "The residual stream per block at the end of training", (
                    f"At the last logged step of each run ({seeds}): the RMS of the stream after each block, the "
                    "drift (cosine similarity between what enters and what leaves a block: 1 = unchanged, 0 = "
                    "replaced) and the update ratio ||F(x)|| / ||x|| of the attention (solid) and FFN (dashed) "
                    "sublayers.")),
        "amax": (plot_panels, "Amax gain of the composite residual mixing", (
                 "HC / mHC only: the largest absolute row sum (forward) or column sum (backward) of the product of the "
                 "residual mixing matrices over depth. Near 1 is stable; large values amplify signals and gradients.")),
        "connection_sums": (plot_panels, "Row and column sums of the connection weights", (
                            f"Multi-stream schemes only ({seeds}), in mHC's notation x' = H_res x + H_post^T "
                            "F(H_pre x): each site's H_res (the stream mix), H_pre (the read) and H_post (the write), "
                            "averaged over the tokens of a log step's batch, then summarised over the sites. A "
                            "doubly-stochastic H_res (mHC) keeps every row and column sum at 1, its deviations at 0 "
                            "(dotted): the skips alone neither grow nor shrink a stream. Unconstrained HC is free to "
                            "move away from it as it trains.")),
    }


def depth_weight_matrices(records: Sequence[dict[str, Any]]) -> dict[str, list[list[float | None]]]:
    """connection -> its depth-weight matrix from the last record that logged one: row r for the r-th average,
    column j for source X_j (0 the embedding), None where the average does not read X_j. A connection qualifies by
    logging `alpha` (each average's weights) and `sources` (the X_j they weigh) in `depth_coefficients`."""
    last = next((r["depth_coefficients"] for r in reversed(records) if isinstance(r.get("depth_coefficients"), dict)),
                {})
    found = {}
    for name, values in last.items():
        rows, sources = values.get("alpha"), values.get("sources")
        if not isinstance(rows, list) or not isinstance(sources, list) or len(rows) != len(sources) or not rows:
            continue
        width = 1 + max((j for row in sources for j in row if isinstance(j, int)), default=0)
        matrix = [[None] * width for _ in rows]
        for r, (weights, columns) in enumerate(zip(rows, sources)):
            for weight, j in zip(weights, columns):
                matrix[r][j] = weight if finite_number(weight) else None
        found[name] = matrix
    return found


def _matrix_panel(ax, matrix: list[list[float | None]], title: str):
    """One heat map of a depth-weight matrix on `ax`, each weight written in its cell; returns the image."""
    import numpy as np

    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    limit = max(float(np.nanmax(np.abs(values))), 1e-9)
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit)
    if values.size <= 400:
        for (r, c), v in np.ndenumerate(values):
            if not np.isnan(v):  # white on the dark cells, black on the light ones
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(v) > 0.6 * limit else "black")
    ax.set_xticks(range(values.shape[1]), ["emb", *(f"B{j - 1}" for j in range(1, values.shape[1]))])
    newest = [max(c for c, v in enumerate(row) if v is not None) for row in matrix]  # X_(i+1): block i's output
    ax.set_yticks(range(values.shape[0]), [f"after B{j - 1}" if j else "embedding" for j in newest])
    ax.set_title(title, fontsize=10)
    ax.grid(False)
    return image


def draw_matrix(matrix: list[list[float | None]], path: Path, title: str) -> None:
    """One depth-weight matrix as a PNG heat map."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        figure, axes = _figure(1, 1, (0.6 * len(matrix[0]) + 2.5, 0.5 * len(matrix) + 1.5))
        image = _matrix_panel(axes[0][0], matrix, title)
        figure.colorbar(image, ax=axes[0][0], shrink=0.8)
        _save(figure, path)


def plot_depth_weights(ablation: Ablation, path: Path, colours: dict[str, str], metrics: list[Metric],
                       title: str) -> bool:
    """The depth-weight matrix each (scheme, depth) learned, from its first seed's last logged coefficients."""
    panels = []
    for scheme in ablation.schemes:
        for depth in ablation.depths:
            runs = sorted(ablation.runs_for(scheme, depth), key=lambda run: run.seed)
            for name, matrix in (depth_weight_matrices(runs[0].records) if runs else {}).items():
                panels.append((f"{scheme}, {depth} blocks ({name}, seed {runs[0].seed})", matrix))
    if not panels:
        return False
    side = max(len(m[0]) for _, m in panels)
    figure, axes = _figure(min(len(panels), 3), math.ceil(len(panels) / 3), (0.55 * side + 2.5, 0.45 * side + 1.8))
    flat = [ax for row in axes for ax in row]
    for ax, (label, matrix) in zip(flat, panels):
        image = _matrix_panel(ax, matrix, label)
        figure.colorbar(image, ax=ax, shrink=0.8)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    figure.suptitle(title, fontsize=12, fontweight="bold")
    _save(figure, path)
    return True


def _lens_figure(ablation: Ablation, path: Path, colours: dict[str, str], metrics: list[Metric], title: str) -> bool:
    from reslab.lens.ablation import plot_lens_by_block  # reads each run's checkpoint, not metrics.jsonl

    return plot_lens_by_block(ablation, path, colours)


LENS_CAPTION = ("For the first seed's finished runs: the next-token loss of the stream after the embedding and after "
                "each block, decoded by the model's own final norm and head (the logit lens, `reslab lens RUN` for "
                "one run), on the run's validation split. Falling block by block: each block refines the prediction. "
                "For a scheme with parallel streams (hc, mhc, mhc-v4, ...) the solid line is the model's own collapse "
                "of its streams and each dotted line one stream decoded alone (`reslab lens RUN`'s second table).")


def plot_forest(ablation: Ablation, path: Path, colours: dict[str, str], metrics: list[Metric], title: str) -> bool:
    """Each scheme's difference in final val loss to the baseline, per depth, with its 95% interval (summary.json's
    paired comparisons); a dashed line at zero."""
    tests = [t for t in ablation.summary.get("comparisons") or [] if isinstance(t, dict)
             and t.get("metric") == "final_val_loss" and all(finite_number(t.get(k)) for k in ("diff", "low", "high"))]
    if not tests:
        return False
    depth = {id(t): t["layers"] if isinstance(t.get("layers"), int) else 0 for t in tests}
    tests.sort(key=lambda t: (depth[id(t)], str(t.get("residual"))))
    figure, axes = _figure(1, 1, (6.4, 0.5 + 0.42 * len(tests)))
    ax = axes[0][0]
    for y, test in enumerate(reversed(tests)):
        colour = colours.get(str(test["residual"]), "black")
        ax.errorbar(test["diff"], y, xerr=[[test["diff"] - test["low"]], [test["high"] - test["diff"]]], fmt="o",
                    color=colour, capsize=4, lw=2)
        ax.annotate(str(test.get("verdict", "")), (test["high"], y), xytext=(6, 0), textcoords="offset points",
                    va="center", fontsize=9, color="#475467")
    ax.axvline(0, color="black", lw=1, ls="--")
    ax.set_yticks(range(len(tests)), [f"{t['residual']}, {t['layers']} blocks" for t in reversed(tests)])
    ax.set_xlabel(f"final val loss minus {ablation.summary.get('baseline')}'s ({NATS}); left of 0 is better")
    ax.margins(x=0.25)
    figure.suptitle(title, fontsize=12, fontweight="bold")
    _save(figure, path)
    return True


DEPTH_WEIGHTS_CAPTION = ("DenseFormer's depth-weighted averages at the end of training: row r is the average after "
                          "a block, column j the source it weighs (emb: the embedding, Bj: block j's output); 1 on "
                          "the newest source and 0 elsewhere is the identity it starts from. As in the DenseFormer "
                          "paper's figure, weights on older outputs show what the model reuses across depth.")

FOREST_CAPTION = ("Each scheme minus the baseline in final validation loss, paired by seed: the point is the mean "
                  "difference, the bar its 95% interval, the label the verdict of the paired t-test after Holm's "
                  "correction over the grid. A bar that crosses the dashed line at zero cannot tell the two apart at "
                  "this number of seeds.")


def make_plots(ablation: Ablation) -> list[Plot]:
    """Write every plot the data allows under DIR/plots/ (every figure a metric's declaration names, then the logit
    lens); returns those written (stale ones are removed)."""
    import matplotlib

    directory = ablation.path / PLOTS
    directory.mkdir(parents=True, exist_ok=True)
    colours = scheme_colours(ablation.schemes)
    seeds = _seed_note(ablation)
    built_in = _figures(seeds)
    specs = []
    for name in figures():
        metrics = in_figure(name)
        draw, title, caption = built_in.get(name) or (plot_vs_step, metrics[0].plot.label.capitalize() + " vs step",
                                                      f"{metrics[0].description} ({seeds}).")
        specs.append((name, draw, title, caption, metrics))
    specs.append(("forest", plot_forest, "Difference to the baseline", FOREST_CAPTION, []))
    specs.append(("depth_weights", plot_depth_weights, "Depth-weight matrices learned by dense connections",
                  DEPTH_WEIGHTS_CAPTION, []))
    specs.append(("lens", _lens_figure, "Logit lens by block", LENS_CAPTION, []))
    written = []
    with matplotlib.rc_context(STYLE):
        for name, draw, title, caption, metrics in specs:
            path = directory / f"{name}.png"
            if draw(ablation, path, colours, metrics, title):
                written.append(Plot(path.name, path, title, caption))
            else:
                path.unlink(missing_ok=True)
    return written


def expected_plots() -> list[str]:
    """The plot files every ablation with diagnostics has: those the report names when they could not be drawn."""
    return [f"{name}.png" for name in figures(expected_only=True)]
