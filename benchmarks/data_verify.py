"""Data files that cannot lie (issue 23), and what it costs: verifying shards on resume, and gathering batches through
maps guarded by leases.

    python benchmarks/data_verify.py verify --token-gb 1,10
    python benchmarks/data_verify.py gather --token-gb 1 --before 6dc4b0c

Synthetic prepared directories of N GB of random uint16 tokens, written once under --workdir as data_scale.py writes
them (32 MiB shards), deleted afterwards unless --keep.
  verify  opening the directory as every start does (manifest validated, every shard opened, size-checked, leased
          and mapped); the resume check when nothing changed since the run started (each shard's size, mtime and
          ctime against the run's record: no byte read); and a full sha256 of every shard, which a resume pays for
          the shards whose stat changed (all of them when the directory was moved or copied) and which
          `data info --verify` pays: one thread a core, page cache cold (dropped first) and warm, and one thread
          warm for reference.
  gather  one batch of 32 windows of 257 tokens (page cache warm): TokenSpan over leased maps (what a run reads),
          TokenSpan over pread (no lease to be had), and, with --before REV, REV's TokenSpan over np.memmap, in one
          process, alternated round by round.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from data_scale import drop_cache, write_tokens

ROOT = Path(__file__).resolve().parents[1]


def seconds(work, repeat: int = 1) -> float:
    """The median wall time of `work()` over `repeat` calls."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_verify(args: argparse.Namespace) -> None:
    print("| tokens | shards | open (every start) | resume check, nothing changed | full sha256, cold, "
          f"{len(os.sched_getaffinity(0))} threads | warm, {len(os.sched_getaffinity(0))} threads | "
          "warm, 1 thread |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for gigabytes in args.token_gb:
        directory = args.workdir / f"tokens-{gigabytes}gb"
        write_tokens(directory, gigabytes)
        print(verify_row(directory, gigabytes), flush=True)
        if not args.keep:
            shutil.rmtree(directory)


def verify_row(directory: Path, gigabytes: float) -> str:
    """One table row: what opening, the resume check and the full checksums cost on `directory`."""
    from reslab.data.shards import check_checksums, check_unchanged, file_sha256, open_prepared

    drop_cache(directory)
    opened = seconds(lambda: open_prepared(directory), 3)
    data = open_prepared(directory)
    recorded = data.record["shard_stats"]
    check = seconds(lambda: check_unchanged(data, recorded, "changed"), 5)
    drop_cache(directory)
    cold = seconds(lambda: check_checksums(data.files, "changed"))
    warm = seconds(lambda: check_checksums(data.files, "changed"))
    single = seconds(lambda: [file_sha256(file.path) for file in data.files])
    size = sum(file.size for file in data.files) / 1e9
    return (f"| {gigabytes} GB | {len(data.files)} | {opened * 1e3:.0f} ms | {check * 1e6:.0f} µs | "
            f"{cold:.1f} s ({size / cold:.2f} GB/s) | {warm:.1f} s ({size / warm:.2f} GB/s) | "
            f"{single:.1f} s ({size / single:.2f} GB/s) |")


def before_token_span(revision: str):
    """`TokenSpan` and `_open_shard` of `revision`'s data/shards.py, loaded beside this tree's."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:src/reslab/data/shards.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "shards_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("shards_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["shards_before"] = module
    spec.loader.exec_module(module)
    return module


def bench_gather(args: argparse.Namespace, batch: int = 32, length: int = 257) -> None:
    from reslab.data.shards import open_prepared

    for gigabytes in args.token_gb:
        directory = args.workdir / f"tokens-{gigabytes}gb"
        write_tokens(directory, gigabytes)
        spans = {"leased maps": open_prepared(directory).train, "pread": open_prepared(directory).train}
        for file in spans["pread"].arrays:
            file.view = None  # as when no lease can be had
        if args.before:
            old = before_token_span(args.before)
            files = sorted(directory.glob("shard-*.bin"))
            spans[f"{args.before} memmap"] = old.TokenSpan(
                [old._open_shard(path, np.dtype(np.uint16), path.stat().st_size // 2, None) for path in files])
        for path in directory.glob("shard-*.bin"):  # warm, as after a run's first steps
            with open(path, "rb") as handle:
                while handle.read(1 << 24):
                    pass
        rng = np.random.default_rng(0)
        limit = min(len(span) for span in spans.values()) - length
        times: dict[str, list[float]] = {name: [] for name in spans}
        for _ in range(args.rounds):
            for name, span in spans.items():
                starts = [rng.integers(0, limit, batch) for _ in range(1000)]
                span.gather(starts[0], length)
                started = time.perf_counter()
                for where in starts:
                    span.gather(where, length)
                times[name].append((time.perf_counter() - started) * 1e3)  # µs per batch
        base = times[next(iter(times))]
        print(f"\n{gigabytes} GB of tokens, batch {batch} x {length}, {args.rounds} rounds of 1,000 batches\n")
        print("| read through | µs per batch (median) | / leased maps, per round (median) |")
        print("| --- | ---: | --- |")
        for name, spent in times.items():
            ratios = [a / b for a, b in zip(spent, base)]
            print(f"| {name} | {statistics.median(spent):.1f} | {statistics.median(ratios):.2f} "
                  f"({', '.join(f'{r:.2f}' for r in ratios)}) |", flush=True)
        del spans
        if not args.keep:
            shutil.rmtree(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("verify", "gather"))
    parser.add_argument("--token-gb", default="1", help="sizes in GB of uint16 tokens (default 1)")
    parser.add_argument("--before", help="gather: also time this git revision's TokenSpan over np.memmap")
    parser.add_argument("--rounds", type=int, default=9, help="gather: rounds of 1,000 batches per reader")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/reslab-data-verify"))
    parser.add_argument("--keep", action="store_true", help="keep the token directories for another run")
    args = parser.parse_args()
    args.token_gb = [int(s) for s in args.token_gb.split(",") if s]
    args.workdir.mkdir(parents=True, exist_ok=True)
    {"verify": bench_verify, "gather": bench_gather}[args.part](args)
    print(f"\nmachine: {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
