"""The ablation report: plots under DIR/plots/ and one self-contained DIR/report.html.

    from reslab.report import write_report
    path = write_report("runs/ablation")   # also: reslab report runs/ablation
"""

from __future__ import annotations

from pathlib import Path

from reslab.ablationdir import REPORT


def write_report(ablation_dir: str | Path, out: str | Path | None = None, baseline: str | None = None,
                 target_loss: float | None = None) -> Path:
    """Draw the plots and write report.html (or `out`) for an ablation directory; returns the report's path.
    `baseline`: the scheme the others are compared with (default: the ablation's, else `pre`); `target_loss`: the
    loss "time to target" measures (default: the highest final val loss of any run).

    A missing or invalid directory raises ReslabError with one line saying what is wrong.
    """
    from reslab.io import atomic_write
    from reslab.report.html import render
    from reslab.report.load import load_ablation
    from reslab.report.plots import make_plots

    ablation = load_ablation(Path(ablation_dir), baseline, target_loss)
    plots = make_plots(ablation)
    for plot in plots:
        _readable(plot.path)
    path = Path(out) if out is not None else ablation.path / REPORT
    atomic_write(path, render(ablation, plots).encode("utf-8"))
    _readable(path)
    return path


def _readable(path: Path) -> None:
    """atomic_write's temp files are private (0600); a report is meant to be opened and shared."""
    try:
        path.chmod(0o644)
    except OSError:
        pass


__all__ = ["REPORT", "write_report"]
