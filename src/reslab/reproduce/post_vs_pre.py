"""Post-LN vs pre-LN vs DeepNorm at depth without learning-rate warmup.

Post-LN puts a norm on the residual path, so gradients near the output are large at init and deep post-LN models
need warmup (Xiong et al. 2020, arXiv 2002.04745); DeepNorm rescales the skip and the init to fix it (Wang et al.
2022, arXiv 2203.00555). Expected: post-LN trains worse or diverges; pre-LN and DeepNorm train.
"""

from __future__ import annotations

import argparse

from reslab.reproduce.common import add_grid_arguments, fmt, loss, print_verdict, run_grid

CLAIM = "without warmup, deep post-LN trains worse than pre-LN and DeepNorm (or diverges)"
SCHEMES = ["post", "pre", "deepnorm"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grid_arguments(parser, "8 minutes (3 schemes x 12 layers x 1000 steps)")


def run(args: argparse.Namespace) -> int:
    depth = 12
    model = {"width": 64, "heads": 2, "context": 64}
    train = {"steps": 1000, "batch": 32, "lr": 1e-3, "warmup": 0, "eval_interval": 250, "log_interval": 50,
             "checkpoint_interval": 500}
    if args.quick:
        depth = 6
        model = {"width": 16, "heads": 2, "context": 16}
        train = {"steps": 100, "batch": 8, "lr": 3e-3, "warmup": 0, "eval_interval": 75, "eval_batches": 10,
                 "log_interval": 25, "checkpoint_interval": 150}
    rows = run_grid("post-vs-pre", args, "tiny", SCHEMES, [depth], [0], model, train)
    post, pre, deepnorm = (loss(rows, s, depth) for s in SCHEMES)
    inf = float("inf")
    agrees = (post or inf) > min(pre or inf, deepnorm or inf)
    measured = f"{depth} layers, no warmup: post {fmt(post)}, pre {fmt(pre)}, deepnorm {fmt(deepnorm)}"
    return print_verdict(args, CLAIM, measured, agrees, {"post": post, "pre": pre, "deepnorm": deepnorm})
