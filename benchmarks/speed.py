"""Issue 7's speed figures in one run: nanoGPT's CPU config under each training-step option, interleaved.

    python benchmarks/speed.py [--rounds 3] [--json out.json]

Every reslab variant runs `reslab.bench.bench` (the same TrainStep `reslab train` uses), and nanoGPT's iteration
runs as re-created in `nanogpt_ref.py`, once per round, interleaved round by round so that load from other processes
on a shared machine hits them alike; the table reports each variant's median ms/iter over rounds and its speed
relative to nanoGPT's measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from nanogpt_ref import nanogpt_ms_per_iter

from reslab.bench import bench, matmul_peak_gflops

NANOGPT_CPU = {"layers": 4, "heads": 4, "width": 128, "context": 64, "bias": False, "dropout": 0.0,
               "activation": "gelu"}  # nanoGPT's MLP uses the exact GELU
REFERENCE = "nanoGPT stand-in (benchmarks/nanogpt_ref.py)"

VARIANTS = {
    "eager fp32, diagnostics off": {"dtype": "fp32", "diagnostics": False},
    "eager fp32, diagnostics every 50": {"dtype": "fp32", "diagnostics": True, "log_interval": 50},
    "eager fp32, GPT-2's tanh GELU, diagnostics off": {"dtype": "fp32", "diagnostics": False,
                                                       "activation": "gelu-tanh"},
    "compiled fp32, diagnostics off": {"dtype": "fp32", "diagnostics": False, "compile": True},
    "compiled fp32, diagnostics every 50": {"dtype": "fp32", "diagnostics": True, "log_interval": 50, "compile": True},
    "eager bf16, diagnostics off": {"diagnostics": False, "dtype": "bf16"},
    "eager bf16, diagnostics every 50": {"diagnostics": True, "log_interval": 50, "dtype": "bf16"},
    "compiled bf16, diagnostics off": {"diagnostics": False, "dtype": "bf16", "compile": True},
}


def run_variant(name: str, options: dict, args: argparse.Namespace, seed: int) -> dict:
    if name == REFERENCE:
        ms = nanogpt_ms_per_iter(batch=12, iters=args.iters, windows=args.windows, seed=seed)
        return {"ms_per_iter": ms, "compiled": False}
    options = dict(options)
    config = {**NANOGPT_CPU, "activation": options.pop("activation", NANOGPT_CPU["activation"])}
    return bench("gpt", config, batch=12, iters=args.iters, windows=args.windows, seed=seed, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--only", help="comma list of reslab variant numbers (1-based) to run besides nanoGPT's")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args()
    variants = list(VARIANTS.items())
    if args.only:
        variants = [variants[int(i) - 1] for i in args.only.split(",")]
    variants = [(REFERENCE, {})] + variants
    results: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for round_ in range(args.rounds):
        for name, options in variants:
            result = run_variant(name, options, args, seed=round_)
            results[name].append(result)
            print(f"round {round_ + 1} {name}: {result['ms_per_iter']:.1f} ms/iter", flush=True)
    peak = matmul_peak_gflops()
    gflop = next(r[0]["gflop_per_iter"] for name, r in results.items() if name != REFERENCE)
    reference = statistics.median(r["ms_per_iter"] for r in results[REFERENCE])
    print(f"\nnanoGPT CPU config (gpt L4 d128 h4 T64, batch 12), {torch.get_num_threads()} threads, "
          f"fp32 matmul peak {peak:.0f} GFLOP/s, {gflop:.2f} GFLOP per iteration\n")
    print("| variant | ms/iter (median) | rounds | tokens/s | GFLOP/s | % of fp32 peak | speed vs nanoGPT: "
          "ratio of medians | median of per-round ratios |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    references = [r["ms_per_iter"] for r in results[REFERENCE]]
    for name, runs in results.items():
        times = [r["ms_per_iter"] for r in runs]
        ms = statistics.median(times)
        gflops = gflop / (ms / 1000)
        per_round = statistics.median(ref / t for ref, t in zip(references, times, strict=True))
        print(f"| {name} | {ms:.1f} | {', '.join(f'{t:.1f}' for t in times)} | {768 / (ms / 1000):,.0f} | "
              f"{gflops:.1f} | {100 * gflops / peak:.0f}% | {reference / ms:.2f}x | {per_round:.2f}x |")
    # Only the first compiled variant of each dtype compiles from scratch: the others reuse torch's in-process caches.
    for name, runs in results.items():
        if runs[0].get("compiled") and runs[0]["compile_seconds"] > 1.0:
            print(f"compile time of {name} (its first step in round 1, excluded above): "
                  f"{runs[0]['compile_seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
