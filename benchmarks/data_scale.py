"""Data at scale (issue 17): prepare throughput, start-up and peak RSS of a short run vs corpus size, and the cost of
one batch from memory-mapped shards vs from an in-memory tensor. Each part can run alone (the timing lock is held per
invocation, so keep each one short):

    python benchmarks/data_scale.py prepare --sizes 10,100,1000 --bpe-sizes 10,100 --workers 2
    python benchmarks/data_scale.py runs --sizes 10,1000 --token-gb 1,10
    python benchmarks/data_scale.py sampling --sizes 10,1000

Synthetic text: seeded random words in lines (ASCII), written once under --workdir.
  prepare   `reslab data prepare` wall time (a fresh process: start-up included) and MB/s, char and byte-level BPE
            (vocab 1024, trained on the first 10 MB); BPE training is also timed alone, and BPE encoding alone by
            preparing again with the trained tokenizer's file (`--tokenizer DIR/tokenizer.reslab.json`).
  runs      a 2-step `reslab train` on tinyshakespeare, on each char-prepared size, and on synthetic prepared
            directories of --token-gb GB of uint16 tokens written directly: start-up (process launch until the
            failpoint `step` kills it, i.e. after step 1's forward and backward, before its optimizer update: an
            upper bound on launch -> first optimizer step), the whole 2-step wall, and peak RSS (ru_maxrss). Shard
            pages are dropped from the page cache before each run (fsync + POSIX_FADV_DONTNEED): a run pays for
            what it maps, and its RSS is its own, not cached folios.
  sampling  one batch of 32 x 256 windows from the shards (page cache warm) and from an in-memory int64 tensor of the
            same tokens (up to 20M), alternated round by round in one process: medians and per-round ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORDS = np.array("the king queen and of my lord good night thou art to be love ROMEO JULIET , . ; ! ?".split())
TRAIN = ["--model", "tiny", "--width", "64", "--heads", "2", "--context", "64", "--batch", "8", "--steps", "2",
         "--eval-batches", "1", "--no-progress"]
SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
PEAK = """
import resource, subprocess, sys, time
started = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
assert done.returncode == 0, done.stderr[-2000:]
print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def write_text(path: Path, megabytes: int) -> None:
    if path.exists() and path.stat().st_size >= megabytes * 10**6:
        return
    rng = np.random.default_rng(megabytes)
    with open(path, "w") as handle:
        written = 0
        while written < megabytes * 10**6:
            words = WORDS[rng.integers(0, len(WORDS), 200_000)]
            block = "\n".join(" ".join(words[i:i + 10]) for i in range(0, len(words), 10)) + "\n"
            handle.write(block)
            written += len(block)


def write_tokens(directory: Path, gigabytes: int, vocab: int = 65, shard_tokens: int = 1 << 24) -> None:
    """A reslab prepared directory of `gigabytes` GB of random uint16 tokens, written directly (no text)."""
    from reslab.data.shards import fingerprint
    from reslab.data.tokenizer import CharTokenizer

    if (directory / "manifest.json").exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    tokens, rng, shards = gigabytes * 10**9 // 2, np.random.default_rng(gigabytes), []
    for index, start in enumerate(range(0, tokens, shard_tokens)):
        part = rng.integers(0, vocab, min(shard_tokens, tokens - start), dtype=np.uint16)
        part.tofile(directory / f"shard-{index:05d}.bin")
        shards.append({"name": f"shard-{index:05d}.bin", "tokens": len(part), "max_id": int(part.max()),
                       "sha256": hashlib.sha256(part).hexdigest()})
    (directory / "tokenizer.reslab.json").write_bytes(CharTokenizer("".join(map(chr, range(48, 48 + vocab))))
                                                       .to_bytes())
    train = int(tokens * 0.9)
    manifest = {"format": "reslab-tokens", "version": 1, "tokenizer": {"kind": "char", "file": "tokenizer.reslab.json"},
                "dtype": "uint16", "vocab_size": vocab, "tokens": tokens, "shards": shards,
                "split": {"train_fraction": 0.9, "train_tokens": train, "val_tokens": tokens - train}}
    manifest["fingerprint"] = fingerprint(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def drop_cache(directory: Path) -> None:
    for path in directory.glob("*.bin"):
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def reslab(*args) -> list[str]:
    return [sys.executable, "-m", "reslab", *map(str, args)]


def timed(command: list[str], env: dict | None = None, ok: tuple[int, ...] = (0,)) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert done.returncode in ok, done.stderr[-2000:]
    return time.perf_counter() - started


def prepare(text: Path, out: Path, workers: int, *extra) -> float:
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return timed(reslab("data", "prepare", text, "--out", out, "--workers", workers, "--no-progress", *extra))


def bench_prepare(args: argparse.Namespace) -> None:
    from reslab.data.tokenizer import BPETokenizer

    print("| text | prepare char | prepare BPE (vocab 1024): all | BPE training alone (10 MB) | BPE encoding alone |")
    print("| --- | --- | --- | --- | --- |")
    for megabytes in args.sizes:
        text = args.workdir / f"text-{megabytes}mb.txt"
        write_text(text, megabytes)
        size = text.stat().st_size / 1e6
        char = prepare(text, args.workdir / f"char-{megabytes}", args.workers)
        row = [f"{megabytes:,} MB", f"{char:.1f} s ({size / char:.0f} MB/s)", "-", "-", "-"]
        if megabytes in args.bpe_sizes:
            bpe_dir = args.workdir / f"bpe-{megabytes}"
            whole = prepare(text, bpe_dir, args.workers, "--tokenizer", "bpe", "--vocab-size", 1024,
                            "--bpe-sample-mb", 10)
            with open(text) as handle:
                lines = handle.read(10**7).splitlines(keepends=True)
            started = time.perf_counter()
            BPETokenizer.train_from_lines(lines, 1024)
            training = time.perf_counter() - started
            encode = prepare(text, args.workdir / "bpe-again", args.workers, "--tokenizer",
                             bpe_dir / "tokenizer.reslab.json")
            row[2:] = [f"{whole:.1f} s ({size / whole:.1f} MB/s)", f"{training:.1f} s",
                       f"{encode:.1f} s ({size / encode:.1f} MB/s)"]
        print("| " + " | ".join(row) + " |", flush=True)


def run_dirs(args: argparse.Namespace) -> list[tuple[str, Path]]:
    dirs = [("tinyshakespeare (1.1M tokens)", args.workdir / "shakespeare")]
    if not (dirs[0][1] / "manifest.json").exists():
        prepare(SHAKESPEARE, dirs[0][1], 1)
    for megabytes in args.sizes:
        if not (args.workdir / f"char-{megabytes}" / "manifest.json").exists():
            write_text(args.workdir / f"text-{megabytes}mb.txt", megabytes)
            prepare(args.workdir / f"text-{megabytes}mb.txt", args.workdir / f"char-{megabytes}", args.workers)
        dirs.append((f"{megabytes:,} MB text, char ({2 * megabytes / 1000:g} GB of tokens)",
                     args.workdir / f"char-{megabytes}"))
    for gigabytes in args.token_gb:
        write_tokens(args.workdir / f"tokens-{gigabytes}gb", gigabytes)
        dirs.append((f"{gigabytes} GB of uint16 tokens (synthetic)", args.workdir / f"tokens-{gigabytes}gb"))
    return dirs


def bench_runs(args: argparse.Namespace) -> None:
    print("| data | start-up: launch -> step 1 backward done (median of 3) | 2-step run: wall | peak RSS | "
          "RSS - tinyshakespeare's |")
    print("| --- | --- | --- | --- | --- |")
    base = None
    for label, directory in run_dirs(args):
        run = reslab("train", *TRAIN, "--data", directory, "--out", args.workdir / "run", "--overwrite")
        starts = []
        for _ in range(3):
            drop_cache(directory)
            starts.append(timed(run, {"RESLAB_FAILPOINTS": "step=kill"}, ok=(-9,)))
        drop_cache(directory)
        out = subprocess.run([sys.executable, "-c", PEAK, *run], capture_output=True, text=True, check=True)
        wall, rss = float(out.stdout.split()[0]), int(out.stdout.split()[1])
        base = rss if base is None else base
        print(f"| {label} | {statistics.median(starts):.2f} s ({', '.join(f'{s:.2f}' for s in starts)}) | "
              f"{wall:.2f} s | {rss / 2**20:,.0f} MiB | {(rss - base) / 2**20:+,.0f} MiB |", flush=True)


def bench_sampling(args: argparse.Namespace, batch: int = 32, context: int = 256, rounds: int = 7) -> None:
    import torch

    from reslab.data import BatchSampler, open_prepared

    print("| data | batch 32 x 256 from shards | from an in-memory int64 tensor | shards / tensor, per round |")
    print("| --- | --- | --- | --- |")
    for label, directory in run_dirs(args)[1:]:
        data = open_prepared(directory)
        for path in sorted(directory.glob("*.bin")):  # warm, as after a run's first steps
            with open(path, "rb") as handle:
                while handle.read(1 << 24):
                    pass
        tensor = torch.from_numpy(data.train.windows(np.array([0]), min(len(data.train), 20_000_000))[0])
        samplers = [BatchSampler(tokens, batch, context, torch.Generator().manual_seed(0))
                    for tokens in (data.train, tensor)]
        times: list[list[float]] = [[], []]
        for _ in range(rounds):
            for sampler, spent in zip(samplers, times):
                sampler.sample()
                started = time.perf_counter()
                for _ in range(1000):
                    sampler.sample()
                spent.append((time.perf_counter() - started) * 1e3)  # µs per batch
        ratios = [a / b for a, b in zip(*times)]
        print(f"| {label} | {statistics.median(times[0]):.0f} µs | {statistics.median(times[1]):.0f} µs | "
              f"median {statistics.median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)}) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("prepare", "runs", "sampling"))
    parser.add_argument("--sizes", default="10,100,1000", help="text sizes in MB (default 10,100,1000)")
    parser.add_argument("--bpe-sizes", default="10,100", help="sizes also prepared with BPE (default 10,100)")
    parser.add_argument("--token-gb", default="", help="runs: synthetic prepared directories of this many GB of tokens")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/reslab-data-scale"))
    args = parser.parse_args()
    args.sizes, args.bpe_sizes, args.token_gb = ([int(s) for s in value.split(",") if s]
                                                for value in (args.sizes, args.bpe_sizes, args.token_gb))
    args.workdir.mkdir(parents=True, exist_ok=True)
    {"prepare": bench_prepare, "runs": bench_runs, "sampling": bench_sampling}[args.part](args)
    print(f"\nmachine: {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
