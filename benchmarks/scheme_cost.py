"""What a residual scheme costs: training-step time of each scheme against pre-LN on one model config.

    python benchmarks/scheme_cost.py                       # the gpt CPU config, every scheme of issue 6
    python benchmarks/scheme_cost.py --profile mhc         # where mhc's extra step time goes (torch.profiler)

A step is forward + backward + AdamW on one fixed batch of random tokens. All schemes are built first, warmed up,
then timed in rounds: each round runs one window of steps per scheme, in a rotated order, so that a shared or
throttled machine slows every scheme alike. Reported: the median wall-clock and CPU ms/step over the windows,
tokens/s, and the ratios to the first scheme (pre).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import reslab
from reslab.heap import tune_malloc
from reslab.train.step import build_adamw

# label -> (scheme, residual options)
SCHEMES: dict[str, tuple[str, dict]] = {
    "pre": ("pre", {}),
    "hc": ("hc", {}),  # 4 streams, static
    "hc-dynamic": ("hc", {"hc_dynamic": True}),
    "mhc": ("mhc", {}),  # 4 streams, 20 Sinkhorn iterations
    "attnres": ("attnres", {}),  # full AttnRes
    "attnres-block2": ("attnres", {"attnres_block": 2}),
    "value-residual": ("value-residual", {}),
    # connections across depth (issue 26), each on pre-LN at its defaults
    "scales": ("scales", {}),
    "x0": ("x0", {}),
    "x0-gated": ("x0", {"x0_gated": True}),
    "unet": ("unet", {}),
    "long-skip": ("long-skip", {}),
    "value-embed": ("value-embed", {}),
    "backout": ("backout", {}),
    "denseformer": ("denseformer", {}),
    "mudd": ("mudd", {}),  # Q, K, V and residual streams
    "mudd-r": ("mudd", {"mudd_streams": "r"}),
    "speedrun": ("speedrun", {}),
}


def build_step(model_name: str, scheme: str, options: dict, config: dict, batch: int, seed: int = 0,
               dtype: str = "fp32"):
    """A closure running one training step of a fresh model on a fixed batch (bf16: under autocast, as training's
    `--dtype bf16`; fp32 weights)."""
    torch.manual_seed(seed)
    model = reslab.build_model(model_name, residual=scheme, residual_options=options, **config)
    optimizer = build_adamw(model, 1e-3, 0.1, (0.9, 0.99), torch.device("cpu"))
    tokens = torch.randint(0, model.config.vocab_size, (batch, model.config.context + 1),
                           generator=torch.Generator().manual_seed(seed))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            logits = model(x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(steps: dict, warmup: int, rounds: int, window: int) -> tuple[dict, dict]:
    """(wall, CPU) ms/step of each closure, one value per window, the schemes interleaved in rotated order.

    CPU time is this process's (all its threads): on a machine shared with other jobs it counts the work done,
    not the time spent waiting for a core, so it is the steadier of the two."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(window):
                steps[name]()
            wall[name].append((time.perf_counter() - start) / window * 1e3)
            cpu[name].append((time.process_time() - start_cpu) / window * 1e3)
    return wall, cpu


def self_cpu_per_step(step, steps: int) -> dict[str, float]:
    """Self CPU ms per step of each torch op (torch.profiler), after 3 untimed steps."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {event.key: event.self_cpu_time_total / 1e3 / steps for event in prof.key_averages()}


def print_extra_time(base_label: str, base: dict[str, float], label: str, target: dict[str, float], rows: int) -> None:
    """The ops where `label` spends more CPU time per step than `base_label`, largest difference first."""
    extra = sorted(((target.get(op, 0.0) - base.get(op, 0.0), op) for op in set(base) | set(target)), reverse=True)
    print(f"self CPU ms/step: {label} {sum(target.values()):.1f}, {base_label} {sum(base.values()):.1f}")
    print(f"| op | {label} | {base_label} | extra |")
    print("| --- | ---: | ---: | ---: |")
    for delta, op in extra[:rows]:
        print(f"| {op} | {target.get(op, 0.0):.1f} | {base.get(op, 0.0):.1f} | {delta:+.1f} |")

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine a second thread mostly waits)")
    parser.add_argument("--schemes", help=f"comma-separated labels (default all: {', '.join(SCHEMES)})")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per scheme")
    parser.add_argument("--rounds", type=int, default=15, help="timed windows per scheme")
    parser.add_argument("--window", type=int, default=10, help="steps per timed window")
    parser.add_argument("--profile", metavar="LABEL",
                        help="instead of timing, profile LABEL against the first scheme: the ops with extra CPU time")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: the step under bf16 autocast (what --dtype auto picks on AMX/AVX512-BF16 CPUs)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_malloc()  # as `reslab train` does in its own process (reslab.heap)
    config = {"layers": args.layers, "width": args.width, "heads": args.heads, "context": args.context,
              "vocab_size": 65}
    labels = args.schemes.split(",") if args.schemes else list(SCHEMES)
    if args.profile:
        base, target = (self_cpu_per_step(build_step(args.model, *SCHEMES[label], config, args.batch), steps=20)
                        for label in (labels[0], args.profile))
        print_extra_time(labels[0], base, args.profile, target, rows=15)
        return 0
    steps = {label: build_step(args.model, *SCHEMES[label], config, args.batch, dtype=args.dtype) for label in labels}
    wall, cpu = measure(steps, args.warmup, args.rounds, args.window)
    tokens = args.batch * args.context
    base_wall, base_cpu = statistics.median(wall[labels[0]]), statistics.median(cpu[labels[0]])
    rows = []
    for label in labels:
        ms, ms_cpu = statistics.median(wall[label]), statistics.median(cpu[label])
        rows.append({"scheme": label, "ms_per_step": ms, "cpu_ms_per_step": ms_cpu,
                     "tokens_per_second": tokens / ms * 1e3, "vs_first": ms / base_wall,
                     "cpu_vs_first": ms_cpu / base_cpu, "wall_range_ms": [min(wall[label]), max(wall[label])]})
    if args.json:
        print(json.dumps({"config": {**config, "model": args.model, "batch": args.batch, "threads": args.threads,
                                     "dtype": args.dtype, "rounds": args.rounds, "window": args.window},
                          "rows": rows}, indent=2))
        return 0
    print(f"{args.model}: {args.layers} layers, width {args.width}, context {args.context}, batch {args.batch}, "
          f"{args.threads} thread(s); median of {args.rounds} windows x {args.window} steps")
    print(f"| scheme | ms/step | tokens/s | vs {labels[0]} | CPU ms/step | CPU vs {labels[0]} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['scheme']} | {row['ms_per_step']:.1f} | {row['tokens_per_second']:,.0f} | "
              f"{row['vs_first']:.2f}x | {row['cpu_ms_per_step']:.1f} | {row['cpu_vs_first']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
