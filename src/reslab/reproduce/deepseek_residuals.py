"""Residual schemes on a small DeepSeek-V3 (MLA attention, DeepSeekMoE feed-forward layers): pre-LN, the scheme
DeepSeek-V3 uses (arXiv 2412.19437), against post-LN, no residual and mHC, DeepSeek's manifold-constrained
hyper-connections (arXiv 2512.24880), which reports a lower final loss than its pre-LN baseline at 27B.

Expected at lab scale: removing the skip trains worst; pre-LN and mHC train at least as well as post-LN.
"""

from __future__ import annotations

import argparse

from reslab.reproduce.common import add_grid_arguments, fmt, loss, print_verdict, run_grid

CLAIM = "on a small DeepSeek (MLA + MoE), no residual trains worst and pre-LN or mHC at least as well as post-LN"
SCHEMES = ["pre", "post", "none", "mhc"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grid_arguments(parser, "13 minutes with --jobs 1 (4 schemes x 6 layers x 500 steps)")


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
    inf = float("inf")
    value = {scheme: inf if number is None else number for scheme, number in numbers.items()}
    agrees = value["none"] > max(value["pre"], value["post"], value["mhc"]) and min(value["pre"], value["mhc"]) <= \
        value["post"]
    measured = f"{depth} layers: " + ", ".join(f"{scheme} {fmt(numbers[scheme])}" for scheme in SCHEMES)
    return print_verdict(args, CLAIM, measured, agrees, numbers)
