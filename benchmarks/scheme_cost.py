"""What a residual scheme costs: training-step time of each scheme against pre-LN on one model config.

    python benchmarks/scheme_cost.py                       # the gpt CPU config, every scheme of issue 6
    python benchmarks/scheme_cost.py --profile mhc         # where one scheme's step time goes (torch.profiler)

A step is forward + backward + AdamW on one fixed batch of random tokens. All schemes are built first, warmed up,
then timed in rounds: each round runs one window of steps per scheme, in a rotated order, so that a shared or
throttled machine slows every scheme alike. Reported: the median ms/step over the windows, tokens/s, and the
ratio to the first scheme (pre).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import reslab
from reslab.train.schedule import build_adamw

# label -> (scheme, residual options)
SCHEMES: dict[str, tuple[str, dict]] = {
    "pre": ("pre", {}),
    "hc": ("hc", {}),  # 4 streams, static
    "hc-dynamic": ("hc", {"hc_dynamic": True}),
    "mhc": ("mhc", {}),  # 4 streams, 20 Sinkhorn iterations
    "attnres": ("attnres", {}),  # full AttnRes
    "attnres-block2": ("attnres", {"attnres_block": 2}),
    "value-residual": ("value-residual", {}),
}


def build_step(model_name: str, scheme: str, options: dict, config: dict, batch: int, seed: int = 0):
    """A closure running one training step of a fresh model on a fixed batch."""
    torch.manual_seed(seed)
    model = reslab.build_model(model_name, residual=scheme, residual_options=options, **config)
    optimizer = build_adamw(model, 1e-3, 0.1, (0.9, 0.99), torch.device("cpu"))
    tokens = torch.randint(0, model.config.vocab_size, (batch, model.config.context + 1),
                           generator=torch.Generator().manual_seed(seed))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(steps: dict, warmup: int, rounds: int, window: int) -> dict[str, list[float]]:
    """ms/step of each closure, one value per window, interleaved in rotated order."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            for _ in range(window):
                steps[name]()
            times[name].append((time.perf_counter() - start) / window * 1e3)
    return times


def profile(step, steps: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for _ in range(3):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--schemes", help=f"comma-separated labels (default all: {', '.join(SCHEMES)})")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per scheme")
    parser.add_argument("--rounds", type=int, default=15, help="timed windows per scheme")
    parser.add_argument("--window", type=int, default=10, help="steps per timed window")
    parser.add_argument("--profile", metavar="LABEL", help="profile one scheme instead of timing all")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = {"layers": args.layers, "width": args.width, "heads": args.heads, "context": args.context,
              "vocab_size": 65}
    labels = args.schemes.split(",") if args.schemes else list(SCHEMES)
    if args.profile:
        scheme, options = SCHEMES[args.profile]
        profile(build_step(args.model, scheme, options, config, args.batch), steps=20, rows=25)
        return 0
    steps = {label: build_step(args.model, *SCHEMES[label], config, args.batch) for label in labels}
    times = measure(steps, args.warmup, args.rounds, args.window)
    base = statistics.median(times[labels[0]])
    tokens = args.batch * args.context
    rows = [{"scheme": label, "ms_per_step": statistics.median(times[label]),
             "tokens_per_second": tokens / statistics.median(times[label]) * 1e3,
             "vs_" + labels[0]: statistics.median(times[label]) / base,
             "spread_ms": [min(times[label]), max(times[label])]} for label in labels]
    if args.json:
        print(json.dumps({"config": {**config, "model": args.model, "batch": args.batch, "threads": args.threads},
                          "rows": rows}, indent=2))
        return 0
    print(f"{args.model}: {args.layers} layers, width {args.width}, context {args.context}, batch {args.batch}, "
          f"{args.threads} threads; median of {args.rounds} windows x {args.window} steps")
    print(f"| scheme | ms/step | tokens/s | vs {labels[0]} |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['scheme']} | {row['ms_per_step']:.1f} | {row['tokens_per_second']:,.0f} | "
              f"{row['vs_' + labels[0]]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
