"""Where a training step's time goes: torch.profiler self CPU time per step, grouped by kind of operation.

    python benchmarks/profile_step.py [--dtype fp32|bf16] [--activation gelu] [--steps 20] [--top 0]

The step is `reslab bench`'s (forward, backward, clip, fused AdamW) on nanoGPT's CPU config; groups are matched on
the aten operator names, so the table adds up to the profiled total. `--top N` also prints the N costliest ops.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from reslab.heap import tune_malloc
from reslab.models import build_model
from reslab.train.config import TrainConfig
from reslab.train.step import TrainStep, build_optimizer

GROUPS = [  # (label, operator-name fragments), first match wins
    ("matmuls (weights)", ("aten::mm", "aten::addmm")),
    ("attention (SDPA forward + backward)", ("scaled_dot_product",)),
    ("MLP activation", ("gelu", "threshold_backward", "clamp_min", "aten::relu", "aten::pow")),
    ("LayerNorm", ("layer_norm",)),
    ("optimizer and clipping", ("adamw", "_foreach", "linalg_vector_norm", "Optimizer.")),
    ("dtype casts", ("aten::copy_", "aten::_to_copy")),
    ("residual adds and gradient accumulation", ("aten::add", "aten::add_")),
    ("embedding, loss", ("embedding", "index_select", "log_softmax", "nll_loss")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--activation", default="gelu")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=0)
    args = parser.parse_args()
    tune_malloc()  # as `reslab train` does in its own process (reslab.heap)
    torch.manual_seed(0)
    net = build_model("gpt", layers=4, heads=4, width=128, context=64, bias=False, dropout=0.0,
                      activation=args.activation)
    cpu = torch.device("cpu")
    step = TrainStep(net, build_optimizer(TrainConfig(model="gpt"), net, cpu), 1.0, cpu, args.dtype)
    tokens = torch.randint(0, net.config.vocab_size, (args.batch, net.config.context + 1))
    for _ in range(10):
        step(tokens[:, :-1], tokens[:, 1:])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step(tokens[:, :-1], tokens[:, 1:])
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1000 / args.steps
    grouped = {label: 0.0 for label, _ in GROUPS}
    other = 0.0
    for event in events:
        ms = event.self_cpu_time_total / 1000 / args.steps
        label = next((label for label, keys in GROUPS if any(k in event.key for k in keys)), None)
        if label is None:
            other += ms
        else:
            grouped[label] += ms
    print(f"gpt L4 d128 h4 T64 batch {args.batch}, {args.dtype}, {args.activation}, "
          f"{torch.get_num_threads()} threads: {total:.1f} ms of self CPU time per step (profiled)\n")
    print("| where | ms per step | share |")
    print("| --- | ---: | ---: |")
    for label, ms in [*grouped.items(), ("everything else (views, allocation, autograd bookkeeping)", other)]:
        print(f"| {label} | {ms:.1f} | {100 * ms / total:.0f}% |")
    if args.top:
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
