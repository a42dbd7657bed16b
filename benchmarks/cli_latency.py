"""CLI start-up: the wall time of `reslab --help` and `reslab list`, for this tree and, optionally, an older commit.

    python benchmarks/cli_latency.py                      # this working tree
    python benchmarks/cli_latency.py --before d18f91e     # and the source of that commit, side by side

Each command runs as a fresh `python -m reslab` subprocess (what a user waits for), once untimed to warm the file
cache, then `--runs` times; the median is reported. The older commit's `src/` is exported with `git archive` into
a temporary directory and run with the same interpreter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["list"])


def median_seconds(src: Path, args: list[str], runs: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-m", "reslab", *args]
    subprocess.run(command, env=env, check=True, capture_output=True)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def export_src(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", metavar="REV", help="also time the src/ of this git revision")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per command (default 10)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"this tree": ROOT / "src"}
        if args.before:
            trees = {args.before: export_src(args.before, Path(scratch)), **trees}
        print(f"median wall seconds over {args.runs} runs ({sys.executable}, Python {sys.version.split()[0]})")
        print(f"{'command':<16}" + "".join(f"{name:>14}" for name in trees))
        for command in COMMANDS:
            row = [median_seconds(src, command, args.runs) for src in trees.values()]
            print(f"{'reslab ' + ' '.join(command):<16}" + "".join(f"{seconds:>14.3f}" for seconds in row))


if __name__ == "__main__":
    main()
