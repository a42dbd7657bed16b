"""The TinyTransformer article's experiment, done right.

The article trained a one-block post-LN char model on Shakespeare (loss ~1.70), deleted the two `x = x + output`
lines, and got ~2.47, crediting the gap to the residual connection. But that edit also threw the attention and FFN
outputs away (the model became a bigram model). Here the same model is trained three ways:
(a) with residuals (`post`), (b) with the article's edit (`article-edit`), (c) truly without residuals
(`post-none`: x = LN(F(x))). (c) - (a) is what the skip is worth; (b) - (c) is what the deleted sublayers were worth.
"""

from __future__ import annotations

import argparse

from reslab.reproduce.common import add_grid_arguments, fmt, loss, print_verdict, run_grid

CLAIM = "the article's 'no residual' gap comes mostly from discarding the sublayers, not from the skip"
SCHEMES = ["post", "article-edit", "post-none"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grid_arguments(parser, "6 minutes (3 runs x 8000 steps)")


def run(args: argparse.Namespace) -> int:
    model = {"width": 64, "heads": 2, "context": 64}
    train = {"steps": 8000, "batch": 32, "lr": 1e-3, "eval_interval": 500, "log_interval": 100,
             "checkpoint_interval": 2000}
    if args.quick:
        model = {"width": 32, "heads": 2, "context": 32}
        train = {"steps": 200, "batch": 16, "lr": 3e-3, "warmup": 20, "eval_interval": 100, "eval_batches": 10,
                 "log_interval": 50, "checkpoint_interval": 200}
    rows = run_grid("tiny-residual", args, "tiny", SCHEMES, [1], [0], model, train)
    with_skip, edit, no_skip = (loss(rows, s, 1) for s in SCHEMES)
    numbers = {"residual": with_skip, "article_edit": edit, "no_residual": no_skip}
    if None in numbers.values():
        return print_verdict(args, CLAIM, f"a run diverged: {numbers}", False, numbers)
    skip_gap, sublayer_gap = no_skip - with_skip, edit - no_skip
    measured = (f"(a) residual {fmt(with_skip)}, (b) article's edit {fmt(edit)}, (c) no residual {fmt(no_skip)}; "
                f"of the article's gap {edit - with_skip:.3f}, the skip explains {skip_gap:.3f} and the discarded "
                f"sublayers {sublayer_gap:.3f}")
    measured += _audit_note()
    return print_verdict(args, CLAIM, measured, sublayer_gap > skip_gap, numbers)


def _audit_note() -> str:
    """What `reslab audit` finds in the edited model: no residuals, and the sublayers it discarded are dead."""
    import torch

    from reslab.graph import audit
    from reslab.models import build_model

    with torch.device("meta"):
        model = build_model("tiny", residual="article-edit")
    report = audit(model, (torch.zeros(1, 8, dtype=torch.long, device="meta"),), target="tiny --residual article-edit")
    return (f"; audit of (b): {len(report.residuals)} residuals, dead: "
            f"{', '.join(report.dead) if report.dead else 'none'}")
