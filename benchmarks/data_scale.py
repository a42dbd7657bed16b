"""Data at scale (issue 17): prepare throughput, start-up time and peak RSS of a short run vs corpus size, and the
cost of one batch from memory-mapped shards vs from an in-memory tensor.

    python benchmarks/data_scale.py --sizes 10,100,1000 --workers 2

Writes synthetic text (seeded random words in lines, ASCII) of each size under --workdir, then for each size:
  * `reslab data prepare --tokenizer char` (and BPE for the sizes in --bpe-sizes): wall time, MB/s;
  * a 2-step `reslab train --data DIR` (start-up + 2 steps): wall time and peak RSS (ru_maxrss of the child);
  * the old path for comparison (sizes <= --memory-max): the whole text read, char-encoded to int64 and split in
    memory, as `reslab train` did before shards: wall time and peak RSS.
Shard pages are dropped from the page cache before each run (fsync + POSIX_FADV_DONTNEED), so a run pays for what it
maps. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORDS = np.array("the king queen and of my lord good night thou art to be love ROMEO JULIET , . ; ! ?".split())
TRAIN = ["--model", "tiny", "--width", "64", "--heads", "2", "--context", "64", "--batch", "8", "--steps", "2",
         "--eval-batches", "1", "--no-progress"]
IN_MEMORY = """
import sys, time
from reslab.data import build_tokenizer, encode_corpus, load_text, split_tokens
started = time.perf_counter()
text, _ = load_text(sys.argv[1])
train, val = split_tokens(encode_corpus(build_tokenizer("char", text), text))
print(time.perf_counter() - started)
"""
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
            lines = [" ".join(words[i:i + 10]) for i in range(0, len(words), 10)]
            block = "\n".join(lines) + "\n"
            handle.write(block)
            written += len(block)


def drop_cache(directory: Path) -> None:
    for path in directory.glob("*.bin"):
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def peak(command: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a command, measured from a fresh parent."""
    out = subprocess.run([sys.executable, "-c", PEAK, *command], capture_output=True, text=True, check=True)
    seconds, rss = out.stdout.split()
    return float(seconds), int(rss)


def reslab(*args) -> list[str]:
    return [sys.executable, "-m", "reslab", *map(str, args)]


def prepare(text: Path, out: Path, workers: int, *extra) -> float:
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    started = time.perf_counter()
    subprocess.run(reslab("data", "prepare", text, "--out", out, "--workers", workers, "--no-progress", *extra),
                   check=True, capture_output=True)
    return time.perf_counter() - started


def sampling_us(directory: Path, batch: int = 32, context: int = 256, repeats: int = 2000) -> tuple[float, float]:
    import torch

    from reslab.data import BatchSampler, open_prepared

    for path in directory.glob("*.bin"):  # warm: the shards in the page cache, as after the first steps of a run
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass
    data = open_prepared(directory)
    tensor = torch.from_numpy(data.train.windows(np.array([0]), min(len(data.train), 20_000_000))[0])
    result = []
    for tokens in (data.train, tensor):
        sampler = BatchSampler(tokens, batch, context, torch.Generator().manual_seed(0))
        sampler.sample()
        started = time.perf_counter()
        for _ in range(repeats):
            sampler.sample()
        result.append((time.perf_counter() - started) / repeats * 1e6)
    return result[0], result[1]


def one_size(megabytes: int, args: argparse.Namespace) -> dict:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    text = work / f"text-{megabytes}mb.txt"
    write_text(text, megabytes)
    size = text.stat().st_size / 1e6
    row = {"size": megabytes, "char_s": prepare(text, work / f"char-{megabytes}", args.workers)}
    row["char_mbs"] = size / row["char_s"]
    if megabytes in args.bpe_sizes:
        row["bpe_s"] = prepare(text, work / f"bpe-{megabytes}", args.workers, "--tokenizer", "bpe", "--vocab-size",
                               "1024", "--bpe-sample-mb", "10")
        row["bpe_mbs"] = size / row["bpe_s"]
    drop_cache(work / f"char-{megabytes}")
    row["run_s"], row["run_rss"] = peak(reslab("train", *TRAIN, "--data", work / f"char-{megabytes}", "--out",
                                               work / f"run-{megabytes}", "--overwrite"))
    if megabytes <= args.memory_max:
        row["old_s"], row["old_rss"] = peak([sys.executable, "-c", IN_MEMORY, str(text)])
    row["sample_shards_us"], row["sample_tensor_us"] = sampling_us(work / f"char-{megabytes}")
    return row


def table(rows: list[dict]) -> str:
    lines = ["| text | prepare char | prepare BPE (1024, 10 MB sample) | 2-step run from shards: wall, peak RSS | "
             "old in-memory load: wall, peak RSS | batch 32x256 from shards (page cache warm) / tensor |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        bpe = f"{r['bpe_s']:.1f} s ({r['bpe_mbs']:.1f} MB/s)" if "bpe_s" in r else "-"
        old = f"{r['old_s']:.1f} s, {r['old_rss'] / 2**20:,.0f} MiB" if "old_s" in r else "-"
        lines.append(f"| {r['size']:,} MB | {r['char_s']:.1f} s ({r['char_mbs']:.0f} MB/s) | {bpe} | "
                     f"{r['run_s']:.1f} s, {r['run_rss'] / 2**20:,.0f} MiB | {old} | "
                     f"{r['sample_shards_us']:.0f} / {r['sample_tensor_us']:.0f} µs |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,1000", help="text sizes in MB (default 10,100,1000)")
    parser.add_argument("--bpe-sizes", default="10,100", help="sizes also prepared with BPE (default 10,100)")
    parser.add_argument("--memory-max", type=int, default=200, help="largest size for the old in-memory path (MB)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", default="/tmp/reslab-data-scale")
    args = parser.parse_args()
    args.bpe_sizes = {int(s) for s in args.bpe_sizes.split(",") if s}
    rows = []
    for megabytes in (int(s) for s in args.sizes.split(",")):
        rows.append(one_size(megabytes, args))
        print(rows[-1], file=sys.stderr, flush=True)
    print(table(rows))
    print(f"\nmachine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; this process peak "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
