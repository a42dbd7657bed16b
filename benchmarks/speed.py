"""Issue 7's speed figures in one run: nanoGPT's CPU config under each training-step option, interleaved.

    python benchmarks/speed.py [--rounds 3] [--json out.json]

Every variant runs `reslab.bench.bench` (the same TrainStep `reslab train` uses) once per round, variants
interleaved round by round so that load from other processes on a shared machine hits them alike; the table
reports each variant's median ms/iter over rounds and its ratio to eager fp32 without diagnostics.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from reslab.bench import bench, matmul_peak_gflops

NANOGPT_CPU = {"layers": 4, "heads": 4, "width": 128, "context": 64, "bias": False, "dropout": 0.0}
NANOGPT_MS = 50.0  # nanoGPT's CPU recipe measured on this machine (issue 7)

VARIANTS = {
    "eager fp32, diagnostics off": {"diagnostics": False},
    "eager fp32, diagnostics every 50": {"diagnostics": True, "log_interval": 50},
    "compiled fp32, diagnostics off": {"diagnostics": False, "compile": True},
    "compiled fp32, diagnostics every 50": {"diagnostics": True, "log_interval": 50, "compile": True},
    "eager bf16, diagnostics off": {"diagnostics": False, "dtype": "bf16"},
    "compiled bf16, diagnostics off": {"diagnostics": False, "dtype": "bf16", "compile": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=25)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--only", help="comma list of variant numbers (1-based) to run")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args()
    variants = list(VARIANTS.items())
    if args.only:
        variants = [variants[int(i) - 1] for i in args.only.split(",")]
    results: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for round_ in range(args.rounds):
        for name, options in variants:
            result = bench("gpt", NANOGPT_CPU, batch=12, iters=args.iters, windows=args.windows, seed=round_,
                           **options)
            results[name].append(result)
            print(f"round {round_ + 1} {name}: {result['ms_per_iter']:.1f} ms/iter", flush=True)
    peak = matmul_peak_gflops()
    base = statistics.median(r["ms_per_iter"] for r in results[variants[0][0]])
    print(f"\nnanoGPT CPU config (gpt L4 d128 h4 T64, batch 12), {torch.get_num_threads()} threads, "
          f"fp32 matmul peak {peak:.0f} GFLOP/s\n")
    print("| variant | ms/iter (median) | tokens/s | GFLOP/s | % of fp32 peak | vs first row | vs nanoGPT 50 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        ms = statistics.median(r["ms_per_iter"] for r in runs)
        gflops = runs[0]["gflop_per_iter"] / (ms / 1000)
        print(f"| {name} | {ms:.1f} | {768 / (ms / 1000):,.0f} | {gflops:.1f} | {100 * gflops / peak:.0f}% | "
              f"{ms / base:.3f}x | {NANOGPT_MS / ms:.2f}x faster |")
    compile_times = [r["compile_seconds"] for runs in results.values() for r in runs if r["compiled"]]
    if compile_times:
        print(f"\ncompile time (first step, excluded above): median {statistics.median(compile_times):.1f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
