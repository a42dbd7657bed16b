"""DenseFormer: does depth-weighted averaging buy depth?

DenseFormer (Pagliardini et al., arXiv 2402.02622) follows every block with a depth-weighted average (DWA) of the
embedding and every earlier block's output, with weights learned and initialised to the identity. The paper: a
48-block DenseFormer matches a 72-block transformer (about 1.5x the depth) in perplexity, at a fraction of its cost.

Here, at CPU scale: `denseformer` at depth L against `pre` at L and at 1.5 L (`gpt`, tinyshakespeare, 3 seeds, the
same steps; the grid also trains DenseFormer at 1.5 L, reported beside). Verdict, on the final val loss paired by
seed: AGREES when DenseFormer at L is below pre at L (the 95% interval of the difference below 0) and not worse than
pre at 1.5 L by more than MARGIN (the interval's upper end at most MARGIN: a non-inferiority test). The learned
depth-weight matrix of the first seed (rows: the DWA after each block; columns: the embedding and the block outputs
it averages) is drawn to `plots/denseformer_weights.png` of the ablation directory (`reslab report` draws every
run's as `plots/depth_weights.png`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reslab.reproduce.common import add_grid_arguments, print_verdict, run_grid

CLAIM = "a DenseFormer of depth L trains better than pre-LN at L and about as well as pre-LN at 1.5 L"
SEEDS = [0, 1, 2]
MARGIN = 0.02  # nats: "about as well" = the paired difference's 95% interval ends at most this far above 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grid_arguments(parser, "20 minutes (2 schemes x depths 4, 6 x 3 seeds x 600 steps, gpt width 64)")


def settings(quick: bool) -> tuple[int, list[int], dict, dict]:
    if quick:
        return 2, [0], {"width": 16, "heads": 2, "context": 16}, {
            "steps": 40, "batch": 8, "lr": 3e-3, "warmup": 5, "eval_interval": 20, "eval_batches": 4,
            "log_interval": 10, "checkpoint_interval": 40}
    return 4, SEEDS, {"width": 64, "heads": 2, "context": 64}, {
        "steps": 600, "batch": 16, "lr": 2e-3, "warmup": 50, "eval_interval": 100, "eval_batches": 20,
        "log_interval": 50, "checkpoint_interval": 600}


def run(args: argparse.Namespace) -> int:
    from reslab.stats import compare
    from reslab.reproduce.speedrun_ladder import per_seed

    depth, seeds, model, train = settings(args.quick)
    deeper = depth * 3 // 2
    rows = run_grid("denseformer-depth", args, "gpt", ["pre", "denseformer"], [depth, deeper], seeds, model, train)
    out = args.out or Path("runs") / "reproduce" / ("denseformer-depth" + ("-quick" if args.quick else ""))
    final = {f"{s}-L{d}": (rows.get((s, d)) or {}).get("final_val_loss_mean")
             for s in ("pre", "denseformer") for d in (depth, deeper)}
    dense = per_seed(out, "denseformer", depth, seeds)
    against_same = compare(dense, per_seed(out, "pre", depth, seeds))
    against_deeper = compare(dense, per_seed(out, "pre", deeper, seeds))
    better_same = against_same.high is not None and against_same.high < 0
    matches_deeper = against_deeper.high is not None and against_deeper.high <= MARGIN
    drawn = draw_weights(out, depth, seeds[0])
    measured = ("val loss at matched steps: " + ", ".join(f"{k} {fmt3(v)}" for k, v in final.items())
                + f"; denseformer-L{depth} minus pre-L{depth}: {diff(against_same)}"
                + f"; minus pre-L{deeper}: {diff(against_deeper)}"
                + (f"; depth-weight matrix drawn to {drawn}" if drawn else ""))
    return print_verdict(args, CLAIM, measured, better_same and matches_deeper,
                         {"final_val_loss": final, "vs_pre_same_depth": against_same.to_dict(),
                          "vs_pre_deeper": against_deeper.to_dict()})


def draw_weights(out: Path, depth: int, seed: int) -> Path | None:
    """The last logged depth-weight matrix of one run, as a heat map under the ablation's plots/."""
    from reslab.ablationdir import PLOTS, AblationDir
    from reslab.report.plots import depth_weight_matrices, draw_matrix
    from reslab.rundir import RunDir

    records = RunDir(AblationDir(out).run_path("denseformer", depth, seed)).read_metrics()
    matrices = depth_weight_matrices(records)
    if not matrices:
        return None
    path = out / PLOTS / "denseformer_weights.png"  # the report's own depth_weights.png is left as it draws it
    path.parent.mkdir(parents=True, exist_ok=True)
    name, matrix = next(iter(matrices.items()))
    draw_matrix(matrix, path, f"DenseFormer depth weights, {depth} blocks, seed {seed} ({name})")
    return path


def diff(test) -> str:
    if test.diff is None:
        return "not measured"
    interval = "" if test.low is None else f" [{test.low:+.3f}, {test.high:+.3f}]"
    return f"{test.diff:+.3f}{interval}"


def fmt3(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
