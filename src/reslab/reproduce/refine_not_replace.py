"""Pre-LN transformers refine one prediction layer by layer instead of replacing it.

With an identity residual the final stream is the embedding plus every write, so what an early block writes is
still in the stream the head reads, and each block nudges the prediction: the logit lens (nostalgebraist 2020)
shows the next-token loss falling block by block. Without the skip (`none`) each block replaces the stream; post-LN
renormalises it at every sublayer. Measured on trained models of 4 and 8 blocks, two seeds each:
- the logit-lens loss after every block, on the validation split (`reslab.lens`);
- survival: the mean cosine similarity between the stream after the first block and the final stream (both as the
  head reads them), i.e. how much of the early stream is still there at the end.
Verdict: with pre-LN the lens loss falls block by block (each block at most TOLERANCE above the previous one, the
last below the first) and the early stream survives better than without the skip.

Measured (tinyshakespeare, 600 steps, means over seeds 0 and 1): AGREES. pre-L8 lens loss by block 3.50, 2.95, 2.86,
2.78, 2.68, 2.62, 2.56, 2.52, survival 0.46; none-L8 3.89, 3.73, 4.24, 4.40, 4.56, 4.26, 4.30, 3.50 (it barely
trains: val loss 3.36 against pre's 2.34), survival 0.18; post-L8 4.10 ... 2.60, survival 0.38.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from reslab.ablationdir import AblationDir
from reslab.reproduce.common import add_grid_arguments, print_verdict, run_grid

CLAIM = "with pre-LN the logit-lens loss falls block by block and early writes survive to the output; not so without"
SCHEMES = ["pre", "none", "post"]
TOLERANCE = 0.05  # nats: "falls block by block" allows this much noise per block
LENS_TOKENS = 512


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grid_arguments(parser, "12 minutes (3 schemes x depths 4, 8 x seeds 0, 1, 600 steps)")


@torch.no_grad()
def read_run(run_dir: Path) -> dict:
    """The logit-lens loss after each block and the survival of the first block's stream, on the validation split."""
    from reslab.lens import lens
    from reslab.lens.capture import capture_forward
    from reslab.lens.inputs import run_input

    given = run_input(run_dir, None, None, LENS_TOKENS, torch.device("cpu"))
    result = lens(given.model, given.inputs, given.targets)
    capture, _ = capture_forward(given.model, given.inputs)
    reduce = given.model.stream.reduce
    early, final = reduce(capture.streams[2]), reduce(capture.streams[-1])  # after block 0's two sublayers; the end
    survival = F.cosine_similarity(early, final, dim=-1).mean().item()
    block_losses = result.loss[2::2]  # the stream after each block (its FFN site)
    return {"block_losses": block_losses, "embed_loss": result.loss[0], "survival": survival}


def mean_over_seeds(records: list[dict]) -> dict:
    losses = torch.tensor([r["block_losses"] for r in records]).mean(0).tolist()
    return {"block_losses": [round(v, 4) for v in losses],
            "survival": round(sum(r["survival"] for r in records) / len(records), 4)}


def falls_block_by_block(losses: list[float]) -> bool:
    steps_ok = all(later <= earlier + TOLERANCE for earlier, later in zip(losses, losses[1:]))
    return steps_ok and losses[-1] < losses[0]


def run(args: argparse.Namespace) -> int:
    depths, seeds = [4, 8], [0, 1]
    model = {"width": 64, "heads": 2, "context": 64}
    train = {"steps": 600, "batch": 16, "lr": 1e-3, "warmup": 50, "eval_interval": 200, "log_interval": 50,
             "checkpoint_interval": 600}
    if args.quick:
        depths, seeds = [2, 4], [0]
        model = {"width": 16, "heads": 2, "context": 16}
        train = {"steps": 60, "batch": 8, "lr": 3e-3, "warmup": 10, "eval_interval": 60, "eval_batches": 5,
                 "log_interval": 30, "checkpoint_interval": 60}
    run_grid("refine-not-replace", args, "gpt", SCHEMES, depths, seeds, model, train)
    out = args.out or Path("runs") / "reproduce" / ("refine-not-replace" + ("-quick" if args.quick else ""))
    numbers = {f"{scheme}-L{depth}": mean_over_seeds([read_run(AblationDir(out).run_path(scheme, depth, seed))
                                                      for seed in seeds])
               for scheme in SCHEMES for depth in depths}
    refines = all(falls_block_by_block(numbers[f"pre-L{d}"]["block_losses"]) for d in depths)
    survives = all(numbers[f"pre-L{d}"]["survival"] > numbers[f"none-L{d}"]["survival"] for d in depths)
    measured = "; ".join(f"{key}: lens loss by block {v['block_losses']}, survival {v['survival']}"
                         for key, v in numbers.items())
    return print_verdict(args, CLAIM, measured, refines and survives, numbers)
