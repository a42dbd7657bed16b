"""The lens of an ablation's trained runs: the logit-lens loss after every block, for the report (`lens.png`) and
for `reslab reproduce refine-not-replace`; for a run with parallel streams (hc, mhc, mhc-v4, ...), each stream's
too."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from reslab.ablationdir import AblationDir
from reslab.errors import ReslabError

REPORT_TOKENS = 256  # validation tokens per run for the report's lens plot


class BlockLens(NamedTuple):
    loss: list[float]  # the model's own (reduced) stream after the embedding and after each block
    streams: list[list[float]] | None  # [stream][entry]: each parallel stream decoded alone; None for one stream


def block_lens(run_dir: Path, tokens: int = REPORT_TOKENS) -> BlockLens:
    """Logit-lens loss on the run's validation split after the embedding and after each block (entry 0, then every
    block's last site), of the model's stream and of each of its parallel streams."""
    from reslab.lens import lens
    from reslab.lens.inputs import run_input

    given = run_input(run_dir, None, None, tokens, torch.device("cpu"))
    result = lens(given.model, given.inputs, given.targets)
    per_block = len(result.loss[1:]) // len(given.model.blocks)

    def by_block(entries: list[float]) -> list[float]:
        return [entries[0], *entries[per_block::per_block]]

    streams = [by_block(stream) for stream in result.streams.loss] if result.streams is not None else None
    return BlockLens(by_block(result.loss), streams)


def block_losses(run_dir: Path, tokens: int = REPORT_TOKENS) -> list[float]:
    """`block_lens(...).loss`: the model's own stream only."""
    return block_lens(run_dir, tokens).loss


def plot_lens_by_block(ablation, path: Path, colours: dict[str, str]) -> bool:
    """The report's lens panel: for each finished run of the first seed, the logit-lens loss after the embedding
    and after every block, one panel per depth. False (nothing drawn) when no run can be read."""
    seed = min((run.seed for run in ablation.runs), default=0)
    curves: dict[tuple[str, int], BlockLens] = {}
    for run in ablation.runs:
        if run.status != "finished" or run.seed != seed:
            continue
        try:
            curves[(run.residual, run.layers)] = block_lens(AblationDir(ablation.path).run_dir(run.name))
        except (ReslabError, OSError):
            continue  # a run whose checkpoint or corpus cannot be read is left out of the panel
    if not curves:
        return False
    draw_curves(curves, colours, path, seed)
    return True


def draw_curves(curves: dict[tuple[str, int], BlockLens], colours: dict[str, str], path: Path, seed: int) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from reslab.io import atomic_write

    depths = sorted({depth for _, depth in curves})
    figure = Figure(figsize=(4.2 * len(depths), 3.6), layout="constrained")
    axes = figure.subplots(1, len(depths), squeeze=False)[0]
    for ax, depth in zip(axes, depths):
        for (scheme, layers), curve in curves.items():
            if layers == depth:
                ax.plot(range(len(curve.loss)), curve.loss, marker="o", label=scheme, color=colours.get(scheme))
                for k, stream in enumerate(curve.streams or []):  # thin, dotted, in the scheme's colour
                    label = f"{scheme}: each of {len(curve.streams)} streams" if k == 0 else None
                    ax.plot(range(len(stream)), stream, linestyle=":", linewidth=0.9, alpha=0.7, label=label,
                            color=colours.get(scheme))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{depth} blocks")
        ax.set_xlabel("after block (0 = embedding)")
        ax.set_ylabel("logit-lens loss")
        ax.legend(fontsize=8)
    figure.suptitle(f"logit lens by block, validation split, seed {seed}")
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
