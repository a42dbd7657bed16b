"""Mix-LN: do pre-LN's deep layers starve of gradient, and does mixing post-LN into the early layers fix it?

Mix-LN (Li, Yin, Liu 2024, arXiv 2412.13795) runs post-LN in the first floor(alpha L) blocks (alpha 0.25, scheme
`mix-ln`, option `mixln_alpha`) and pre-LN after. The paper: with pre-LN the gradient norm shrinks in the deeper
layers (they learn little, and can be pruned at small cost), while post-LN starves the early ones instead; Mix-LN
gives the deep layers larger gradients than pre-LN does and trains to a loss at most pre-LN's.

Here (`gpt`, 12 blocks, tinyshakespeare, 3 seeds): post, pre and mix-ln trained alike. Measured per run, as means
over every logged step of `block_grad_norms` (each block's parameters' gradient L2 norm, before clipping): the deeper
half's mean norm, the early quarter's, and the deep share (the deeper half's mean over all blocks' mean). The share
decides, not the raw norm: a pre-LN block's gradient scales as one over the size of the stream it normalises, which
post-LN blocks keep at unit RMS and pre-LN lets start at the embedding's 0.02, so raw norms compare stream sizes
across schemes rather than where the gradient goes. Also the final val loss. Verdict, paired by seed
(`reslab.stats.compare`): AGREES when mix-ln's deep share is above pre's (the 95% interval of the difference above
0) and mix-ln's final val loss is not above pre's by more than MARGIN (the interval's upper end at most MARGIN: a
non-inferiority test). One seed (`--quick`) gives no interval: never AGREES.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reslab.reproduce.common import add_grid_arguments, print_verdict, run_grid

CLAIM = "pre-LN's deeper layers get smaller gradients than Mix-LN's, and Mix-LN's final loss is at most pre-LN's"
SCHEMES = ["post", "pre", "mix-ln"]
SEEDS = [0, 1, 2]
PARTS = ("deep", "early", "deep_share")
MARGIN = 0.02  # nats: "at most pre-LN's" = the paired difference's 95% interval ends at most this far above 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grid_arguments(parser, "15 minutes (3 schemes x 3 seeds x 1000 steps, gpt width 48, 12 layers)")


def settings(quick: bool) -> tuple[int, list[int], dict, dict]:
    if quick:
        return 4, [0], {"width": 16, "heads": 2, "context": 16}, {
            "steps": 40, "batch": 8, "lr": 3e-3, "warmup": 5, "eval_interval": 20, "eval_batches": 4,
            "log_interval": 10, "checkpoint_interval": 40}
    return 12, SEEDS, {"width": 48, "heads": 2, "context": 64}, {
        "steps": 1000, "batch": 16, "lr": 2e-3, "warmup": 100, "eval_interval": 250, "eval_batches": 20,
        "log_interval": 25, "checkpoint_interval": 1000}


def block_gradients(run_dir: Path) -> dict[str, float | None]:
    """Means over logged steps: the mean block gradient norm over the deeper half and over the early quarter, and the
    deep share (the deeper half's mean over every block's mean: scale-free, so schemes whose streams differ in size
    compare by where the gradient goes, not by how large it is)."""
    from reslab.rundir import RunDir

    records = [r["block_grad_norms"] for r in RunDir(run_dir).read_metrics() if r.get("block_grad_norms")]
    if not records:
        return dict.fromkeys(PARTS)
    blocks = len(records[0])
    deep, early = range(blocks // 2, blocks), range(max(1, blocks // 4))

    def over(r: list[float], part: range) -> float:
        return sum(r[i] for i in part) / len(part)

    shares = [over(r, deep) / over(r, range(blocks)) for r in records if sum(r) > 0]
    return {"deep": sum(over(r, deep) for r in records) / len(records),
            "early": sum(over(r, early) for r in records) / len(records),
            "deep_share": sum(shares) / len(shares) if shares else None}


def per_seed_gradients(out: Path, scheme: str, depth: int, seeds: list[int]) -> dict[str, dict[int, float | None]]:
    """{part: {seed: value}} of one scheme's runs, for each of PARTS."""
    from reslab.ablationdir import AblationDir

    read = {seed: block_gradients(AblationDir(out).run_path(scheme, depth, seed)) for seed in seeds}
    return {part: {seed: read[seed][part] for seed in seeds} for part in PARTS}


def run(args: argparse.Namespace) -> int:
    from reslab.reproduce.speedrun_ladder import per_seed
    from reslab.stats import compare

    depth, seeds, model, train = settings(args.quick)
    run_grid("mix-ln", args, "gpt", SCHEMES, [depth], seeds, model, train)
    out = args.out or Path("runs") / "reproduce" / ("mix-ln" + ("-quick" if args.quick else ""))
    losses = {s: per_seed(out, s, depth, seeds) for s in SCHEMES}
    grads = {s: per_seed_gradients(out, s, depth, seeds) for s in SCHEMES}
    deep_test = compare(grads["mix-ln"]["deep_share"], grads["pre"]["deep_share"])
    loss_test = compare(losses["mix-ln"], losses["pre"])
    deeper_grads = deep_test.low is not None and deep_test.low > 0
    no_worse = loss_test.high is not None and loss_test.high <= MARGIN
    table = {s: {"final_val_loss": mean(losses[s]), "deep_grad_norm": mean(grads[s]["deep"]),
                 "early_grad_norm": mean(grads[s]["early"]),
                 "deep_grad_share": mean(grads[s]["deep_share"])} for s in SCHEMES}
    measured = (f"{depth} layers, {len(seeds)} seed(s), means over seeds: "
                + "; ".join(f"{s} val loss {fmt3(v['final_val_loss'])}, deep-half grad norm "
                            f"{fmt3(v['deep_grad_norm'], 4)}, early-quarter {fmt3(v['early_grad_norm'], 4)}, "
                            f"deep share {fmt3(v['deep_grad_share'])}"
                            for s, v in table.items())
                + f"; mix-ln minus pre, deep share: {describe(deep_test)}, val loss: {describe(loss_test)}")
    numbers = {"schemes": table, "per_seed": {s: {"final_val_loss": losses[s], **grads[s]} for s in SCHEMES},
               "deep_share_vs_pre": deep_test.to_dict(), "loss_vs_pre": loss_test.to_dict()}
    return print_verdict(args, CLAIM, measured, deeper_grads and no_worse, numbers)


def mean(values: dict[int, float | None]) -> float | None:
    """The mean over the seeds with a value; None when none has one (every run diverged or logged nothing)."""
    kept = [v for v in values.values() if v is not None]
    return sum(kept) / len(kept) if kept else None


def describe(test, digits: int = 3) -> str:
    if test.diff is None:
        return "not measured"
    interval = "" if test.low is None else f" [{test.low:+.{digits}f}, {test.high:+.{digits}f}]"
    return f"{test.diff:+.{digits}f}{interval}"


def fmt3(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
