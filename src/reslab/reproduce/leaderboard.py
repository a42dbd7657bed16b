"""Every residual scheme in the catalogue, on `gpt` and `llama`, at two depths and five seeds, on tinyshakespeare at a
fixed step budget; ranked at equal steps and at equal wall time, each against `pre` with a paired test.

    reslab reproduce leaderboard --write docs/leaderboard.md      # the full table (see docs/leaderboard.md)
    reslab reproduce leaderboard --quick                          # two schemes, one depth, two seeds: a smoke test

Each model's grid is an ordinary ablation directory (runs/leaderboard/<model>), so it resumes like one, runs its
points in parallel processes (--jobs) and takes a new scheme by running the command again: finished points are
reused, only the new scheme's train.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

from reslab.errors import ReslabError

CLAIM = "every residual scheme, ranked with 95 percent intervals and paired tests against pre"
MODELS = ("gpt", "llama")
LAYERS = (4, 12)
SEEDS = (0, 1, 2, 3, 4)
SHAPE = {"width": 32, "heads": 2, "context": 32}
TRAIN = {"steps": 150, "batch": 8, "lr": 3e-3, "warmup": 15, "eval_interval": 25, "eval_batches": 4,
         "log_interval": 25, "checkpoint_interval": 150, "data": "tinyshakespeare", "dtype": "fp32"}
QUICK = {"schemes": ["pre", "none"], "layers": [1], "seeds": [0, 1], "models": ["gpt"],
         "shape": {"width": 16, "heads": 2, "context": 16},
         "train": {**TRAIN, "steps": 20, "batch": 4, "warmup": 5, "eval_interval": 10, "eval_batches": 2,
                   "log_interval": 10, "checkpoint_interval": 20}}  # a smoke test, not a result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="two schemes, one depth, two seeds, gpt only (a test)")
    parser.add_argument("--schemes", help="comma list (default: every scheme `reslab list` shows)")
    parser.add_argument("--data", help="corpus (default tinyshakespeare: ../shared/data or the cache)")
    parser.add_argument("--out", type=Path, help="directory of the grids (default runs/leaderboard[-quick])")
    parser.add_argument("--jobs", type=int, help="grid points trained in parallel (default: one per core)")
    parser.add_argument("--write", type=Path, metavar="FILE.md", help="also write the table and plots to this "
                        "Markdown file (plots beside it, in FILE/); default: OUT/leaderboard.md only")
    parser.epilog = ("Full mode: 14 schemes x 2 depths x 5 seeds x 2 models = 280 runs of 150 steps at width 32; "
                     "about an hour on 2 CPU cores.")


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """The grid this invocation trains: schemes, depths, seeds, models, shape and training settings."""
    from reslab.data.sources import normalise_data
    from reslab.registry import names

    chosen = QUICK if args.quick else {"schemes": names("residual scheme"), "layers": list(LAYERS),
                                       "seeds": list(SEEDS),
                                       "models": list(MODELS), "shape": SHAPE, "train": TRAIN}
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()] if args.schemes else chosen["schemes"]
    unknown = [s for s in schemes if s not in names("residual scheme")]
    if unknown:
        raise ReslabError(f"--schemes: {unknown[0]!r} is not a residual scheme; `reslab list` shows them")
    if "pre" not in schemes:
        schemes = ["pre", *schemes]  # the baseline every scheme is compared with
    train = dict(chosen["train"])
    if args.data:
        train["data"] = normalise_data(args.data)
    return {**chosen, "schemes": schemes, "train": train}


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from reslab.ablate.executors import local_executor
    from reslab.ablate.grid import run_ablation

    grid = plan(args)
    out = args.out or Path("runs") / ("leaderboard-quick" if args.quick else "leaderboard")
    points = len(grid["schemes"]) * len(grid["layers"]) * len(grid["seeds"])
    jobs = args.jobs or max(1, min(os.cpu_count() or 1, points))
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    started, results = time.time(), {}
    for model in grid["models"]:
        results[model] = run_ablation(out / model, model, grid["schemes"], grid["layers"], grid["seeds"],
                                      grid["shape"], grid["train"], executor=local_executor(jobs),
                                      command=args.argv, console=console, compare={"baseline": "pre"}, shuffle=0)
    from reslab.reproduce.leaderboard_page import write_page

    context = {"command": " ".join(args.argv), "machine": machine(), "wall_seconds": time.time() - started,
               "grid": grid, "out": str(out)}
    for path in {out / "leaderboard.md", *([args.write] if args.write else [])}:
        write_page(path, results, {m: out / m for m in grid["models"]}, context)
        console.print(f"leaderboard: {path}")
    return 0


def machine() -> str:
    """One line: the CPU, its cores and the torch build, as the page records it."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}, torch " \
           f"{torch.__version__}"
