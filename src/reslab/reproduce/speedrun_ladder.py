"""The modded-nanogpt speedrun's residual ladder at CPU scale: does each of its residual steps help here?

The speedrun (GPT-2 124M to 3.28 val loss on FineWeb) took its late-2024 records with, in order: value residual and
the embedding re-injected into every block with learned per-block lambdas (record #9, 2024-11-06), U-net skips
(#11, 2024-11-10; later one gated long skip, #45), value embeddings (#14, 2024-12-04, generalising the value
residual). Each record lowered the time to the target, i.e. each step helped there.

Here each rung adds one step to the one before, on pre-LN (`gpt`, tinyshakespeare, 3 seeds):

    pre -> +value-embed -> +scales (learned residual and branch lambdas) -> +x0 -> +long-skip (= the speedrun recipe)

and `value-residual` (the record-#9 form of the value step, a scheme of its own) beside the ladder. Measured: the
final val loss at matched steps and the val loss at matched wall time (the shortest run's training time at that
depth); each rung against the rung below it, paired by seed (`reslab.stats.compare`). Verdict: AGREES when the full
ladder ends below pre at matched steps (the direction of the records) with the 95% interval of the paired difference
below 0 (one seed, as in --quick, gives no interval: never AGREES); the output names the steps that lowered the mean
here, and by how much, with their intervals.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reslab.reproduce.common import add_grid_arguments, print_verdict, run_grid

CLAIM = "the speedrun's residual steps (value embeddings, learned lambdas, x0, long skip) lower the val loss here too"
LADDER = ["pre", "pre+value-embed", "pre+value-embed+scales", "pre+value-embed+scales+x0",
          "pre+value-embed+scales+x0+long-skip"]
BESIDE = ["value-residual"]
SEEDS = [0, 1, 2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grid_arguments(parser, "25 minutes (6 schemes x 3 seeds x 600 steps, gpt width 64, 6 layers)")


def settings(quick: bool) -> tuple[int, list[int], dict, dict]:
    if quick:
        return 4, [0], {"width": 16, "heads": 2, "context": 16}, {
            "steps": 40, "batch": 8, "lr": 3e-3, "warmup": 5, "eval_interval": 20, "eval_batches": 4,
            "log_interval": 20, "checkpoint_interval": 40}
    return 6, SEEDS, {"width": 64, "heads": 2, "context": 64}, {
        "steps": 600, "batch": 16, "lr": 2e-3, "warmup": 50, "eval_interval": 100, "eval_batches": 20,
        "log_interval": 50, "checkpoint_interval": 600}


def per_seed(out: Path, scheme: str, depth: int, seeds: list[int]) -> dict[int, float | None]:
    """Each seed's final val loss, read from its run's summary.json (None for a missing or diverged run)."""
    from reslab.ablationdir import AblationDir

    values = {}
    for seed in seeds:
        path = AblationDir(out).run_path(scheme, depth, seed) / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        values[seed] = summary.get("final_val_loss")
    return values


def steps_table(out: Path, depth: int, seeds: list[int]) -> list[dict]:
    """Each rung against the rung below it, paired by seed: the mean difference and its interval."""
    from reslab.stats import compare

    rows = []
    for lower, upper in zip(LADDER, LADDER[1:]):
        test = compare(per_seed(out, upper, depth, seeds), per_seed(out, lower, depth, seeds))
        rows.append({"step": upper.rsplit("+", 1)[-1], "rung": upper, "diff": test.diff, "low": test.low,
                     "high": test.high, "p": test.p, "seeds": test.n})
    return rows


def describe(step: dict) -> str:
    if step["diff"] is None:
        return f"+{step['step']}: not measured"
    interval = "" if step["low"] is None else f" [{step['low']:+.3f}, {step['high']:+.3f}]"
    return f"+{step['step']} {step['diff']:+.3f}{interval}"


def run(args: argparse.Namespace) -> int:
    from reslab.stats import compare

    depth, seeds, model, train = settings(args.quick)
    schemes = [*LADDER, *BESIDE]
    rows = run_grid("speedrun-ladder", args, "gpt", schemes, [depth], seeds, model, train)
    out = args.out or Path("runs") / "reproduce" / ("speedrun-ladder" + ("-quick" if args.quick else ""))
    at = {scheme: rows.get((scheme, depth), {}) for scheme in schemes}
    steps = steps_table(out, depth, seeds)
    final = {s: at[s].get("final_val_loss_mean") for s in schemes}
    timed = {s: at[s].get("val_loss_at_matched_time_mean") for s in schemes}
    overall = compare(per_seed(out, LADDER[-1], depth, seeds), per_seed(out, LADDER[0], depth, seeds))
    agrees = overall.high is not None and overall.high < 0
    helped = [s["step"] for s in steps if s["diff"] is not None and s["diff"] < 0]
    measured = (f"{depth} layers, {len(seeds)} seed(s), val loss at matched steps: "
                + ", ".join(f"{s} {fmt3(final[s])}" for s in schemes)
                + "; at matched wall time: " + ", ".join(f"{s} {fmt3(timed[s])}" for s in schemes)
                + "; each step against the rung below (diff, 95% interval): " + "; ".join(map(describe, steps))
                + f"; steps that lowered the mean loss here: {', '.join(helped) or 'none'}"
                + f"; the whole ladder against pre: {describe({'step': 'all', **overall.to_dict()})}")
    return print_verdict(args, CLAIM, measured, agrees, {"final_val_loss": final, "val_loss_at_matched_time": timed,
                                                          "steps": steps, "vs_pre": overall.to_dict()})


def fmt3(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
