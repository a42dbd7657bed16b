"""Plain (`none`) vs residual (`pre`) transformers at growing depth, same budget: plain nets get worse as they get
deeper (the degradation problem of He et al. 2016), residual nets do not."""

from __future__ import annotations

import argparse

from reslab.reproduce.common import add_grid_arguments, fmt, loss, print_verdict, run_grid

CLAIM = "without residuals deeper transformers train worse; with pre-LN residuals they do not"
TOLERANCE = 0.02  # nats: "does not get worse" allows this much noise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grid_arguments(parser, "12 minutes (depths 2, 4, 8, 16 x 2 schemes, 1000 steps)")


def run(args: argparse.Namespace) -> int:
    depths = [2, 4, 8, 16]
    model = {"width": 64, "heads": 2, "context": 64}
    train = {"steps": 1000, "batch": 32, "lr": 1e-3, "eval_interval": 250, "log_interval": 50,
             "checkpoint_interval": 500}
    if args.quick:
        depths = [1, 4]
        model = {"width": 16, "heads": 2, "context": 16}
        train = {"steps": 120, "batch": 8, "lr": 3e-3, "warmup": 20, "eval_interval": 100, "eval_batches": 10,
                 "log_interval": 50, "checkpoint_interval": 200}
    rows = run_grid("depth", args, "tiny", ["none", "pre"], depths, [0], model, train)
    plain = {d: loss(rows, "none", d) for d in depths}
    residual = {d: loss(rows, "pre", d) for d in depths}
    shallow, deep = depths[0], depths[-1]
    inf = float("inf")
    plain_worse = (plain[deep] or inf) > (plain[shallow] or inf) + TOLERANCE
    residual_fine = (residual[deep] or inf) <= (residual[shallow] or inf) + TOLERANCE
    measured = ("none " + ", ".join(f"L{d} {fmt(plain[d])}" for d in depths)
                + "; pre " + ", ".join(f"L{d} {fmt(residual[d])}" for d in depths))
    numbers = {"none": plain, "pre": residual}
    return print_verdict(args, CLAIM, measured, plain_worse and residual_fine, numbers)
