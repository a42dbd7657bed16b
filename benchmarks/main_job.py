"""The main job end to end: `reslab ablate` with its defaults (the README's first command after install), wall time.

    python benchmarks/main_job.py --rounds 2                                  # this tree
    python benchmarks/main_job.py --rounds 2 --before bb1689c                 # and an older commit, alternated
    python benchmarks/main_job.py --rounds 2 --variant bf16="--dtype bf16"    # and this tree with extra flags
    python benchmarks/main_job.py --rounds 2 --before bb1689c --flags="--dtype bf16"   # flags for every run

Every run is a whole `python -m reslab ablate --out NEW` process, report included, as a user runs it. Variants are
alternated round by round; each run holds the shared timing lock (`--lock`, default /tmp/reslab-bench.lock) only
for itself, so a long comparison never starves other users of the machine. Printed per run: wall seconds, the
slowest point's training tokens/s, and the 1-minute load average before and after (other sessions' load shows).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_latency import ROOT, export_src  # noqa: E402  (a sibling script, not a package)


def run_once(src: Path, flags: list[str], out: Path, lock: Path) -> dict:
    """One main job into a fresh `out`, under the lock: wall seconds, slowest point's tokens/s, load before/after."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-m", "reslab", "ablate", "--out", str(out), *flags]
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        load_after = os.getloadavg()[0]
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    speeds = [json.loads(p.read_text())["tokens_per_second"] for p in (out / "runs").glob("*/summary.json")]
    return {"wall": wall, "slowest_tok_s": min(speeds), "load": (load_before, load_after),
            "report": (out / "report.html").exists()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", metavar="REV", help="also run the src/ of this git revision")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="also run this tree with extra ablate flags (repeatable)")
    parser.add_argument("--flags", default="", help="extra ablate flags for every run, e.g. --flags=\"--dtype bf16\"")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lock", type=Path, default=Path("/tmp/reslab-bench.lock"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reslab-mainjob-") as scratch:
        common = shlex.split(args.flags)
        variants = {"this tree": (ROOT / "src", common)}
        if args.before:
            variants = {args.before: (export_src(args.before, Path(scratch)), common), **variants}
        for item in args.variant:
            name, _, flags = item.partition("=")
            variants[name] = (ROOT / "src", common + shlex.split(flags))
        walls: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(args.rounds):
            for name, (src, flags) in variants.items():
                out = Path(scratch) / f"mj-{round_}-{len(walls[name])}-{abs(hash(name))}"
                result = run_once(src, flags, out, args.lock)
                walls[name].append(result["wall"])
                print(f"round {round_} {name:<14} wall {result['wall']:6.1f} s  slowest point "
                      f"{result['slowest_tok_s']:7,.0f} tok/s  load {result['load'][0]:.2f} -> {result['load'][1]:.2f}"
                      f"  report {'yes' if result['report'] else 'NO'}", flush=True)
        first = next(iter(variants))
        for name, values in walls.items():
            ratios = " ".join(f"{a / b:.2f}" for a, b in zip(walls[first], values))
            print(f"{name:<14} median wall {statistics.median(values):6.1f} s   {first} / {name} per round: {ratios}")


if __name__ == "__main__":
    main()
