"""CompleteP: does the best learning rate found at a shallow depth stay best when the model gets deeper?

CompleteP (Dey et al. 2025, arXiv 2505.01618; scheme `completep`) scales every residual branch by (L/L_base)^-alpha
with alpha 1, draws branch weights without a depth factor and trains blocks at lr x (L/L_base)^(alpha-1) with Adam
epsilon x (L/L_base)^-alpha, so that hyper-parameters tuned at L_base layers transfer to L layers; under the standard
parametrisation (plain pre-LN) the best learning rate drifts with depth (the paper's figure 1).

Here (`gpt`, tinyshakespeare): a learning-rate sweep (5 log-spaced rates, a factor 2 apart) at depths 2 and 8, 3
seeds, for `completep` tuned at depth 2 (`completep_base_layers` 2, alpha its default 1) and for `pre`. Each rate is
an ablation directory of its own, DIR/SCHEME/lr-RATE/ (the two schemes take different options, so they cannot
share one). Measured: the final val loss, mean over seeds, per scheme, depth and rate, drawn to
DIR/plots/depth_transfer.png (val loss vs lr, a panel per scheme, a line per depth, the best rate starred); the best
rate per scheme and depth is the one of least mean loss (a diverged run counts as infinitely bad). Verdict: AGREES
when completep's best rate is the same at every depth and pre's is not.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from reslab.reproduce.common import add_grid_arguments, print_verdict, run_grid

CLAIM = "the best learning rate at depth 2 stays best at depth 8 under CompleteP and drifts under plain pre-LN"
SCHEMES = {"completep": {"completep_base_layers": 2}, "pre": {}}
PLOT = "depth_transfer.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grid_arguments(parser, "20 minutes (2 schemes x 5 rates x depths 2, 8 x 3 seeds x 500 steps, gpt width 32)")


def settings(quick: bool) -> tuple[list[int], list[int], list[float], dict, dict]:
    """(depths, seeds, learning rates, model overrides, train overrides)."""
    if quick:
        return [2, 4], [0], [3e-3, 1e-2], {"width": 16, "heads": 2, "context": 16}, {
            "steps": 20, "batch": 8, "warmup": 4, "eval_interval": 20, "eval_batches": 2, "log_interval": 20,
            "checkpoint_interval": 20}
    return [2, 8], [0, 1, 2], [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], {"width": 32, "heads": 2, "context": 64}, {
        "steps": 500, "batch": 16, "warmup": 50, "eval_interval": 250, "eval_batches": 20, "log_interval": 50,
        "checkpoint_interval": 500}


def lr_dir(out: Path, scheme: str, lr: float) -> Path:
    """The ablation directory of one scheme's runs at one learning rate."""
    return out / scheme / f"lr-{lr:g}"


def sweep(args: argparse.Namespace, out: Path) -> dict[str, dict[int, dict[float, float | None]]]:
    """Train every (scheme, rate) grid; {scheme: {depth: {lr: mean final val loss or None}}}."""
    depths, seeds, lrs, model, train = settings(args.quick)
    losses: dict[str, dict[int, dict[float, float | None]]] = {s: {d: {} for d in depths} for s in SCHEMES}
    for scheme, options in SCHEMES.items():
        overrides = {**model, **({"residual_options": options} if options else {})}
        for lr in lrs:
            grid_args = argparse.Namespace(**{**vars(args), "out": lr_dir(out, scheme, lr)})
            rows = run_grid("depth-transfer", grid_args, "gpt", [scheme], depths, seeds, overrides,
                            {**train, "lr": lr})
            for depth in depths:
                losses[scheme][depth][lr] = (rows.get((scheme, depth)) or {}).get("final_val_loss_mean")
    return losses


def best_lr(by_lr: dict[float, float | None]) -> float | None:
    """The rate of least loss (a diverged run counts as infinitely bad); None when every rate diverged."""
    finite = {lr: v for lr, v in by_lr.items() if v is not None and math.isfinite(v)}
    return min(finite, key=finite.get) if finite else None


def run(args: argparse.Namespace) -> int:
    out = args.out or Path("runs") / "reproduce" / ("depth-transfer" + ("-quick" if args.quick else ""))
    losses = sweep(args, out)
    best = {s: {d: best_lr(by_lr) for d, by_lr in per_depth.items()} for s, per_depth in losses.items()}
    plot = draw_sweep(losses, best, out / "plots" / PLOT)
    depths = list(losses["pre"])

    def transfers(scheme: str) -> bool:
        return best[scheme][depths[0]] is not None and len(set(best[scheme].values())) == 1

    drifts = len(set(best["pre"].values())) > 1 and None not in best["pre"].values()
    measured = "; ".join(
        f"{s}: " + ", ".join(f"L{d} best lr {fmt_lr(best[s][d])} (val loss by lr "
                             + " ".join(f"{lr:g}:{fmt3(v)}" for lr, v in losses[s][d].items()) + ")" for d in depths)
        for s in SCHEMES) + f"; plot {plot}"
    numbers = {"final_val_loss": {s: {f"L{d}": {f"{lr:g}": v for lr, v in by_lr.items()} for d, by_lr in per.items()}
                                  for s, per in losses.items()},
               "best_lr": {s: {f"L{d}": lr for d, lr in per.items()} for s, per in best.items()},
               "plot": str(plot)}
    return print_verdict(args, CLAIM, measured, transfers("completep") and drifts, numbers)


def draw_sweep(losses: dict, best: dict, path: Path) -> Path:
    """Final val loss vs learning rate (log axis): a panel per scheme, a line per depth, the best rate starred."""
    from matplotlib.figure import Figure

    from reslab.io import atomic_write

    figure = Figure(figsize=(4.2 * len(losses) + 0.6, 3.8), layout="constrained")
    axes = figure.subplots(1, len(losses), squeeze=False, sharey=True)[0]
    for ax, (scheme, per_depth) in zip(axes, losses.items()):
        for depth, by_lr in per_depth.items():
            points = [(lr, v) for lr, v in by_lr.items() if v is not None and math.isfinite(v)]
            if not points:
                continue
            line, = ax.plot(*zip(*points), marker="o", label=f"{depth} layers")
            if best[scheme][depth] is not None:
                ax.plot([best[scheme][depth]], [by_lr[best[scheme][depth]]], marker="*", markersize=16,
                        color=line.get_color(), linestyle="none")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(scheme)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9)
    axes[0].set_ylabel("final val loss (mean over seeds)")
    figure.suptitle("Learning-rate transfer across depth (star: best rate)")
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    return path


def fmt_lr(value: float | None) -> str:
    return "none (all diverged)" if value is None else f"{value:g}"


def fmt3(value: float | None) -> str:
    return "diverged" if value is None else f"{value:.3f}"
