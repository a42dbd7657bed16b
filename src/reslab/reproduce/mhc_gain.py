"""mHC's stability claim: constraining the stream mix to doubly-stochastic matrices keeps the composite mix's gain
near 1, where unconstrained hyper-connections let it grow.

DeepSeek's mHC paper (arXiv 2512.24880) measures the *Amax gain magnitude* of the product of the stream-mixing
matrices over the depth (largest absolute row sum: forward signal; column sum: backward gradient): at 27B, HC
peaks near 3000 with a loss spike, mHC stays at or below about 1.6. Here both train at depth 12 (24 residual
sites, 4 streams, dynamic HC against mHC) on the default corpus, and the gain logged at every log step is
compared. At this scale HC's gain grows far less than at 27B; the claim checked is the ordering and mHC's bound.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from reslab.rundir import RunDir

CLAIM = "mHC keeps the composite stream-mix gain near 1 (paper: <= ~1.6) while HC's grows (paper: ~3000 at 27B)"
PAPER = {"hc": 3000.0, "mhc": 1.6}
RUNS = {"hc": {"streams": 4, "hc_dynamic": True}, "mhc": {"streams": 4}}  # scheme -> residual options
LAYERS = 12


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small, fast version (about a minute)")
    parser.add_argument("--data", help="corpus: shakespeare (default), tinyshakespeare, or a text file")
    parser.add_argument("--out", type=Path, help="run directories go here (default runs/reproduce/mhc-gain[-quick])")
    parser.add_argument("--json", action="store_true", help="print the verdict and numbers as JSON")
    parser.epilog = ("Full mode takes about 10 minutes on 2 CPU cores (2 runs x 600 steps at width 64; measured "
                     "9.6 min: hc peak gain 208, mhc 1.000); --quick about 1 minute.")


def settings(quick: bool) -> tuple[dict, dict]:
    """(model overrides, training overrides) of the gpt runs."""
    if quick:
        model = {"layers": LAYERS, "width": 32, "heads": 2, "context": 32}
        train = {"steps": 150, "batch": 8, "lr": 3e-3, "warmup": 20, "log_interval": 10, "eval_interval": 150,
                 "eval_batches": 5, "checkpoint_interval": 150}
    else:
        model = {"layers": LAYERS, "width": 64, "heads": 4, "context": 64}
        train = {"steps": 600, "batch": 16, "lr": 3e-3, "warmup": 60, "log_interval": 10, "eval_interval": 200,
                 "eval_batches": 20, "checkpoint_interval": 300}
    return model, train


def train_and_read_gain(scheme: str, options: dict, model: dict, train: dict, run_dir: Path) -> dict:
    """Train one run; return its peak and final Amax gain (from metrics.jsonl) and its final validation loss."""
    from reslab.train.trainer import prepare
    from reslab.train.trainer import train as run_training

    setup = prepare({**train, "model": "gpt", "progress": False},
                    {**model, "residual": scheme, "residual_options": options}, run_dir,
                    overwrite=run_dir.exists())
    summary = run_training(setup)
    records = RunDir(run_dir).read_metrics()
    gains = [(r["step"], r["amax_gain_forward"], r["amax_gain_backward"]) for r in records if "amax_gain_forward" in r]
    return {
        "peak_forward": max(g[1] for g in gains),
        "peak_backward": max(g[2] for g in gains),
        "peak": max(max(g[1], g[2]) for g in gains),
        "final": max(gains[-1][1], gains[-1][2]),
        "logged_steps": len(gains),
        "final_val_loss": summary.get("final_val_loss"),
    }


def run(args: argparse.Namespace) -> int:
    from reslab.data.sources import normalise_data
    from reslab.reproduce.common import print_verdict

    model, train = settings(args.quick)
    if args.data:
        train["data"] = normalise_data(args.data)
    out = args.out or Path("runs") / "reproduce" / ("mhc-gain" + ("-quick" if args.quick else ""))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small are bound by per-op overhead, which a second thread only adds to
    try:
        start = time.perf_counter()
        results = {scheme: train_and_read_gain(scheme, options, model, train, out / scheme)
                   for scheme, options in RUNS.items()}
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    hc, mhc = results["hc"], results["mhc"]
    agrees = mhc["peak"] <= PAPER["mhc"] and hc["peak"] > mhc["peak"]
    measured = (f"peak Amax gain at depth {LAYERS} over {train['steps']} steps: hc {hc['peak']:.3f} "
                f"(paper, 27B: ~{PAPER['hc']:.0f}), mhc {mhc['peak']:.3f} (paper: <= ~{PAPER['mhc']})")
    if not args.json:
        print(f"gpt, {LAYERS} layers, width {model['width']}, 4 streams; {seconds:.0f} s; runs in {out}")
        for scheme, numbers in results.items():
            print(f"  {scheme:<4} peak gain forward {numbers['peak_forward']:.4f}, backward "
                  f"{numbers['peak_backward']:.4f}, at the end {numbers['final']:.4f}; "
                  f"val loss {numbers['final_val_loss']:.3f}")
    return print_verdict(args, CLAIM, measured, agrees, {**results, "paper": PAPER, "seconds": seconds})
