"""Residual schemes on a small DeepSeek-V3 (MLA attention, DeepSeekMoE feed-forward layers): pre-LN, the scheme
DeepSeek-V3 uses (arXiv 2412.19437), against post-LN, no residual and mHC, DeepSeek's manifold-constrained
hyper-connections (arXiv 2512.24880), which reports a lower final loss than its pre-LN baseline at 27B. Then the
same question on a small DeepSeek-V4 (shared-KV attention with sinks, hash and top-k MoE), whose own residual is
mHC as V4 ships it (`mhc-v4`): against pre-LN and no residual.

Expected at lab scale: removing the skip trains worst; pre-LN and mHC train at least as well as post-LN; on V4,
its mHC trains at least as well as pre-LN.
"""

from __future__ import annotations

import argparse

from reslab.reproduce.common import add_grid_arguments, fmt, loss, print_verdict, run_grid

CLAIM = ("on a small DeepSeek (MLA + MoE), no residual trains worst and pre-LN or mHC at least as well as post-LN; "
         "on a small DeepSeek-V4, its mHC at least as well as pre-LN")
SCHEMES = ["pre", "post", "none", "mhc"]
V4_SCHEMES = ["mhc-v4", "pre", "none"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grid_arguments(parser, "25 minutes with --jobs 1 (V3: 4 schemes, V4: 3 schemes, x 6 layers x 500 steps)")


def run(args: argparse.Namespace) -> int:
    depth = 6
    model = {"context": 64}  # deepseek's defaults: width 128, 8 routed experts top-2, 1 shared, first block dense
    train = {"steps": 500, "batch": 16, "lr": 1e-3, "warmup": 50, "eval_interval": 250, "log_interval": 50,
             "checkpoint_interval": 500}
    if args.quick:
        depth = 2
        model = {"width": 32, "heads": 2, "context": 16, "moe_experts": 4, "moe_hidden": 16}
        train = {"steps": 60, "batch": 8, "lr": 3e-3, "warmup": 0, "eval_interval": 60, "eval_batches": 5,
                 "log_interval": 20, "checkpoint_interval": 60}
    rows = run_grid("deepseek-residuals", args, "deepseek", SCHEMES, [depth], [0], model, train)
    numbers = {scheme: loss(rows, scheme, depth) for scheme in SCHEMES}
    v4_model = {key: value for key, value in model.items() if key != "moe_hidden"}  # V4: one expert size
    v4_args = argparse.Namespace(**{**vars(args), "out": args.out / "v4" if args.out else None})
    v4_rows = run_grid("deepseek-residuals-v4", v4_args, "deepseek-v4", V4_SCHEMES, [depth], [0], v4_model, train)
    numbers["deepseek-v4"] = {scheme: loss(v4_rows, scheme, depth) for scheme in V4_SCHEMES}
    value = _finite(numbers)
    v4 = _finite(numbers["deepseek-v4"])
    agrees = (value["none"] > max(value["pre"], value["post"], value["mhc"])
              and min(value["pre"], value["mhc"]) <= value["post"]
              and v4["none"] > max(v4["pre"], v4["mhc-v4"]) and v4["mhc-v4"] <= v4["pre"])
    measured = (f"{depth} layers: " + ", ".join(f"{scheme} {fmt(numbers[scheme])}" for scheme in SCHEMES)
                + "; DeepSeek-V4: " + ", ".join(f"{s} {fmt(numbers['deepseek-v4'][s])}" for s in V4_SCHEMES))
    return print_verdict(args, CLAIM, measured, agrees, numbers)


def _finite(numbers: dict) -> dict:
    """Final losses with a diverged cell (None) as infinity, so it compares as the worst."""
    return {key: float("inf") if number is None else number for key, number in numbers.items()
            if not isinstance(number, dict)}
