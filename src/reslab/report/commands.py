"""`reslab report DIR`: plots and a self-contained report.html for an ablation directory."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands) -> None:
    report = commands.add_parser("report", help="draw the plots and write report.html for an ablation directory")
    report.add_argument("dir", type=Path, metavar="DIR", help="an ablation directory (the --out of `reslab ablate`)")
    report.add_argument("--out", type=Path, metavar="FILE",
                        help="where to write the HTML (default DIR/report.html); plots always go to DIR/plots/")
    report.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from reslab.errors import ReslabError
    from reslab.io import command_line
    from reslab.report import write_report

    if args.out is not None and args.out.is_dir():
        raise ReslabError(f"--out {args.out} is a directory; give a file name such as "
                          f"{command_line('--out', args.out / 'report.html')}")
    path = write_report(args.dir, args.out)
    print(path)
    return 0
