"""`reslab report DIR`: plots and a self-contained report.html for an ablation directory."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands) -> None:
    report = commands.add_parser("report", help="draw the plots and write report.html for an ablation directory")
    report.add_argument("dir", type=Path, metavar="DIR", help="an ablation directory (the --out of `reslab ablate`)")
    report.add_argument("-o", "--output", dest="out", type=Path, metavar="FILE",
                        help="the HTML file to write (default DIR/report.html); plots always go to DIR/plots/")
    report.add_argument("--out", dest="out", type=Path, help=argparse.SUPPRESS)  # the old name of --output
    add_comparison_arguments(report)
    report.set_defaults(handler=cmd_report)


def add_comparison_arguments(parser) -> None:
    """--baseline and --target-loss, shared with `reslab ablate` (which records them in ablation.json)."""
    parser.add_argument("--baseline", help="the scheme every other is compared with, paired by seed (default: pre "
                        "when in the grid, else the first scheme)")
    parser.add_argument("--target-loss", type=_finite, metavar="LOSS", help="the val loss 'time to target' measures "
                        "(default: the highest final val loss of any run, which every run reaches)")


def cmd_report(args: argparse.Namespace) -> int:
    from reslab.errors import ReslabError
    from reslab.io import command_line
    from reslab.report import write_report

    if args.out is not None and args.out.is_dir():
        raise ReslabError(f"--output {args.out} is a directory; give a file name such as "
                          f"{command_line('--output', args.out / 'report.html')}")
    path = write_report(args.dir, args.out, args.baseline, args.target_loss)
    print(path)
    return 0


def _finite(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value
