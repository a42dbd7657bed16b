"""Does training several seeds as ONE batched model pay on this CPU? The main job's model (`tiny`, 4 blocks, width 64,
batch 32, context 64), one thread (as each ablation worker runs).

    python benchmarks/batched_seeds.py [--rounds 2] [--steps 25]

Per round, alternated, milliseconds for one optimisation step of ALL k seeds (k = 2, 3):
- separate: k models, one after another (what the ablation workers do today, point by point);
- vmapped: `torch.func.stack_module_state` + `torch.vmap(functional_call)`: one model whose every weight has a
  leading seed dimension, per-seed losses, per-seed gradient clipping, one fused AdamW over the stacked tensors;
- one batch of k x 32 rows through one model: the floor a batched model could reach if batching were free.
fp32 and bf16 autocast. A ratio below 1 in the last columns means batching loses.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

from reslab.models import build_model

SHAPE = {"residual": "pre", "layers": 4, "width": 64, "context": 64, "vocab_size": 65}
BATCH = 32


def models(k: int) -> list[torch.nn.Module]:
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(build_model("tiny", **SHAPE))
    return out


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def separate(k: int, dtype: str, rows: int = BATCH):
    nets = models(k)
    optimizers = [torch.optim.AdamW(net.parameters(), 1e-3, fused=True) for net in nets]
    batches = [torch.randint(0, 65, (rows, 64)) for _ in nets]

    def step() -> None:
        for net, optimizer, x in zip(nets, optimizers, batches):
            with autocast(dtype):
                logits = net(x).logits
            F.cross_entropy(logits.flatten(0, 1).float(), x.flatten()).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def vmapped(k: int, dtype: str):
    nets = models(k)
    base = copy.deepcopy(nets[0]).to("meta")
    params, buffers = stack_module_state(nets)
    optimizer = torch.optim.AdamW(list(params.values()), 1e-3, fused=True)
    x = torch.randint(0, 65, (k, BATCH, 64))

    def forward(p, b, xi):
        return functional_call(base, (p, b), (xi,)).logits

    def step() -> None:
        with autocast(dtype):
            logits = torch.vmap(forward)(params, buffers, x)
        losses = F.cross_entropy(logits.flatten(0, 2).float(), x.flatten(), reduction="none").view(k, -1).mean(1)
        losses.sum().backward()  # seeds share no parameter: each gets the gradient of its own loss
        grads = [p.grad for p in params.values()]
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # one norm per seed
        scale = (1.0 / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def milliseconds(step, steps: int) -> float:
    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import warnings
    warnings.filterwarnings("ignore", message=".*batching rule.*")  # vmap's per-sample fallback for CPU flash SDPA
    results: dict[tuple[str, int, str], list[float]] = {}
    for round_ in range(args.rounds):
        for dtype in ("fp32", "bf16"):
            for k in (2, 3):
                for name, make in (("separate", separate), ("vmapped", vmapped),
                                   ("one batch", lambda k, d: separate(1, d, rows=k * BATCH))):
                    results.setdefault((dtype, k, name), []).append(milliseconds(make(k, dtype), args.steps))
    print(f"ms per step of all k seeds, median of {args.rounds} rounds; 1 thread")
    print(f"{'dtype':<6}{'k':>3}{'separate':>10}{'vmapped':>10}{'one batch':>11}{'sep/vmap':>10}{'sep/batch':>11}")
    for dtype in ("fp32", "bf16"):
        for k in (2, 3):
            sep, vm, one = (statistics.median(results[(dtype, k, n)]) for n in ("separate", "vmapped", "one batch"))
            print(f"{dtype:<6}{k:>3}{sep:>10.1f}{vm:>10.1f}{one:>11.1f}{sep / vm:>10.2f}{sep / one:>11.2f}")


if __name__ == "__main__":
    main()
