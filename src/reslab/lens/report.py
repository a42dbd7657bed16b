"""The lens as text (a table by layer) and as PNG plots (matplotlib, Agg, no pyplot state)."""

from __future__ import annotations

from pathlib import Path

from reslab.io import atomic_write
from reslab.lens.result import LensResult

DPI = 110


def lens_table(result: LensResult) -> str:
    """One row per entry: loss, entropy, top-1 agreement with the output, KL to the output, and (additive
    schemes) the mean direct logit contribution of that component to the correct token (`LensResult.table`, whose
    columns a notebook shows too)."""
    return result.table()


def lens_notes(result: LensResult) -> list[str]:
    """What the table means, in a few lines."""
    return result.notes()


def plot_lens(result: LensResult, directory: Path) -> list[Path]:
    """lens.png (loss, entropy and KL by layer) and, for additive schemes, contributions.png (a heatmap of each
    component's direct logit contribution by position, averaged over windows)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "lens.png"]
    _save(_by_layer(result), paths[0])
    if result.decomposition is not None:
        paths.append(directory / "contributions.png")
        _save(_heatmap(result), paths[1])
    return paths


def _by_layer(result: LensResult):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.4), layout="constrained")
    axes = figure.subplots(1, 3)
    steps = range(len(result.names))
    for ax, metric, label in zip(axes, ("loss", "entropy", "kl"), ("next-token loss", "entropy", "KL(final || lens)")):
        ax.plot(steps, getattr(result, metric), marker="o", label="logit lens")
        if result.tuned:
            ax.plot(steps, result.tuned[metric], marker="s", label="tuned lens")
            ax.legend(fontsize=7)
        ax.set_title(label)
        ax.set_xticks(list(steps), result.names, rotation=60, fontsize=7)
        ax.grid(alpha=0.3)
    figure.suptitle(f"logit lens, {result.scheme}: {result.tokens} tokens")
    return figure


def _heatmap(result: LensResult):
    from matplotlib.figure import Figure

    values = result.decomposition.contributions.mean(1)  # (components, positions), averaged over windows
    limit = values.abs().max().item() or 1.0
    figure = Figure(figsize=(max(5, 0.25 * values.shape[1] + 3), 0.35 * values.shape[0] + 1.5), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(values.numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_yticks(range(values.shape[0]), result.decomposition.names, fontsize=8)
    ax.set_xlabel("position")
    ax.set_title(f"direct logit contribution to the correct token ({result.scheme})")
    figure.colorbar(image, ax=ax)
    return figure


def _save(figure, path: Path) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))
