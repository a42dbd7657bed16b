"""Shared plumbing of the training reproductions: each is a small ablation grid plus a verdict on its numbers."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console


def add_grid_arguments(parser: argparse.ArgumentParser, full_minutes: str) -> None:
    parser.add_argument("--quick", action="store_true", help="a small, fast version (about a minute; used in tests)")
    parser.add_argument("--data", help="corpus: shakespeare (default), tinyshakespeare, or a text file")
    parser.add_argument("--out", type=Path, help="ablation directory (default runs/reproduce/NAME[-quick])")
    parser.add_argument("--jobs", type=int, help="parallel grid points (default: one per core)")
    parser.add_argument("--json", action="store_true", help="print the verdict and numbers as JSON")
    parser.epilog = f"Full mode takes about {full_minutes} on 2 CPU cores."


def run_grid(name: str, args: argparse.Namespace, model: str, residuals: list[str], layers: list[int],
             seeds: list[int], model_overrides: dict[str, Any], train_overrides: dict[str, Any]) -> dict:
    """Run (or continue) the grid under runs/reproduce/NAME and return {(residual, layers): summary row}."""
    from reslab.ablate.executors import local_executor
    from reslab.ablate.grid import run_ablation
    from reslab.ablate.summary import summary_table
    from reslab.data.sources import normalise_data

    out = args.out or Path("runs") / "reproduce" / (name + ("-quick" if args.quick else ""))
    train = {**train_overrides}
    if args.data:
        train["data"] = normalise_data(args.data)
    jobs = args.jobs or max(1, min(os.cpu_count() or 1, len(residuals) * len(layers) * len(seeds)))
    console = Console(stderr=True, highlight=False)
    result = run_ablation(out, model, residuals, layers, seeds, model_overrides, train, executor=local_executor(jobs),
                          command=["reslab", "reproduce", name] + (["--quick"] if args.quick else []),
                          console=console)
    if not args.json:
        Console(width=160).print(summary_table(result))
    return {(row["residual"], row["layers"]): row for row in result["rows"]}


def loss(rows: dict, residual: str, layers: int) -> float | None:
    """Mean final val loss of a grid cell; None when every seed diverged."""
    row = rows.get((residual, layers))
    return None if row is None else row["final_val_loss_mean"]


def fmt(value: float | None) -> str:
    return "diverged" if value is None else f"{value:.3f}"


def print_verdict(args: argparse.Namespace, claim: str, measured: str, agrees: bool, numbers: dict) -> int:
    line = f"verdict: {claim}: {measured} -> {'AGREES' if agrees else 'DISAGREES'}"
    if getattr(args, "quick", False):  # the diagram reproductions have no quick mode
        line += " (quick mode: too short to be conclusive; run without --quick)"
    if args.json:
        print(json.dumps({"claim": claim, "measured": measured, "agrees": agrees, "numbers": numbers,
                          "verdict": line}, indent=2))
    else:
        Console(highlight=False, soft_wrap=True).print(line)
    return 0
