"""A stand-in for nanoGPT's CPU training iteration, so reslab's speed can be compared with it in the same process.

It reproduces the computation nanoGPT (Karpathy, github.com/karpathy/nanoGPT) runs for its shakespeare-char CPU
recipe, written here from that description: pre-LN blocks with bias-free LayerNorms, one fused qkv projection,
`scaled_dot_product_attention(is_causal=True)`, a 4x MLP with the exact GELU, a tied head, cross-entropy over the
flattened logits; AdamW with weight decay on matrices only and torch's default implementation on CPU (nanoGPT asks
for the fused kernel on CUDA only); gradient clipping at 1.0 and `zero_grad(set_to_none=True)`; a batch of random
windows stacked from a uint16 array per iteration; the loss read back every iteration (its CPU recipe logs every
step). Nothing of it is used by reslab itself.

Run as a script it trains on a text file with nanoGPT's shakespeare-char CPU recipe (char vocabulary, 90/10 split,
AdamW lr 1e-3 -> 1e-4 cosine after 100 warmup iterations, evaluation every 250 over 20 batches per split) and prints
one JSON line: median ms per iteration and the last evaluation. `benchmarks/peers.py` runs it as a peer process:

    python benchmarks/nanogpt_ref.py --data ../shared/data/tinyshakespeare.txt --steps 2000
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class _LayerNorm(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width, bias=False)
        self.c_proj = nn.Linear(width, width, bias=False)

    def forward(self, x):
        batch, seq, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        q, k, v = (t.view(batch, seq, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(batch, seq, width))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = _LayerNorm(width), _Attention(width, heads), _LayerNorm(width)
        self.c_fc, self.c_proj = nn.Linear(width, 4 * width, bias=False), nn.Linear(4 * width, width, bias=False)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPTLike(nn.Module):
    def __init__(self, vocab: int = 65, context: int = 64, width: int = 128, layers: int = 4, heads: int = 4):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.h = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.ln_f = _LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def nanogpt_ms_per_iter(batch: int = 12, context: int = 64, iters: int = 20, windows: int = 5, warmup: int = 10,
                        seed: int = 0) -> float:
    """Median ms per training iteration of the stand-in, timed like `reslab.bench.bench`."""
    torch.manual_seed(seed)
    model = NanoGPTLike(context=context)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
    data = np.random.default_rng(seed).integers(0, 65, 100_000).astype(np.uint16)

    def get_batch():
        ix = torch.randint(len(data) - context, (batch,))
        x = torch.stack([torch.from_numpy(data[i:i + context].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + context].astype(np.int64)) for i in ix])
        return x, y

    def iteration(x, y):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3
        loss = model(x, y)
        x, y = get_batch()  # nanoGPT fetches the next batch while the forward's work is queued
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        return x, y

    x, y = get_batch()
    for _ in range(warmup):
        x, y = iteration(x, y)
    times = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(iters):
            x, y = iteration(x, y)
        times.append((time.perf_counter() - start) / iters * 1000)
    return sorted(times)[len(times) // 2]


# -- the stand-in as a whole training run (a peer process of benchmarks/peers.py) ----------------------------------

RECIPE = {"batch": 12, "context": 64, "lr": 1e-3, "min_lr": 1e-4, "warmup": 100, "eval_interval": 250,
          "eval_iters": 20, "beta2": 0.99, "weight_decay": 0.1, "grad_clip": 1.0}


def char_splits(path: str) -> tuple[np.ndarray, np.ndarray, int]:
    """nanoGPT's shakespeare_char preparation: sorted characters as the vocabulary, the first 90% to train."""
    text = Path(path).read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:], len(chars)


def nanogpt_lr(it: int, steps: int, recipe: dict = RECIPE) -> float:
    """nanoGPT's schedule: linear warmup, then cosine from lr to min_lr at `steps` (lr_decay_iters = max_iters)."""
    lr, floor, warmup = recipe["lr"], recipe["min_lr"], recipe["warmup"]
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    ratio = min(1.0, (it - warmup) / max(1, steps - warmup))
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - floor)


def plain_training_run(loss_fn, model: nn.Module, splits: tuple[np.ndarray, np.ndarray], steps: int,
                       seed: int, recipe: dict = RECIPE) -> dict:
    """nanoGPT's training loop around any model: `loss_fn(x, y)` returns the mean cross-entropy. Iterations are
    timed like nanoGPT's log (forward to loss.item()); evaluations are not in the iteration times."""
    rng = torch.Generator().manual_seed(seed)
    splits = dict(zip(("train", "val"), splits, strict=True))
    batch, context = recipe["batch"], recipe["context"]

    def get_batch(split: str):
        ix = torch.randint(len(splits[split]) - context, (batch,), generator=rng)
        x = torch.stack([torch.from_numpy(splits[split][i:i + context].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(splits[split][i + 1:i + 1 + context].astype(np.int64)) for i in ix])
        return x, y

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": recipe["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=recipe["lr"], betas=(0.9, recipe["beta2"]))
    times, evals = [], {}
    x, y = get_batch("train")
    for it in range(steps + 1):
        if it % recipe["eval_interval"] == 0 or it == steps:
            evals[it] = _evaluate(loss_fn, model, get_batch, recipe["eval_iters"])
        if it == steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = nanogpt_lr(it, steps, recipe)
        start = time.perf_counter()
        loss = loss_fn(x, y)
        x, y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    return {"ms_per_iter": 1000 * statistics.median(times[10:] or times), "steps": steps,
            "val_loss": evals[steps]["val"], "train_loss": evals[steps]["train"],
            "parameters": sum(p.numel() for p in params)}


@torch.no_grad()
def _evaluate(loss_fn, model: nn.Module, get_batch, iters: int) -> dict[str, float]:
    model.eval()
    out = {split: statistics.fmean(loss_fn(*get_batch(split)).item() for _ in range(iters))
           for split in ("train", "val")}
    model.train()
    return out


def run_arguments(description: str) -> argparse.ArgumentParser:
    """The flags of a peer training run (this script's, and x-transformers' worker in peers.py)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a UTF-8 text file (tinyshakespeare)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--eval-iters", type=int, default=RECIPE["eval_iters"], help="batches per evaluation")
    parser.add_argument("--eval-interval", type=int, default=RECIPE["eval_interval"])
    return parser


def recipe_of(args: argparse.Namespace) -> dict:
    return {**RECIPE, "eval_iters": args.eval_iters, "eval_interval": args.eval_interval}


def main() -> None:
    args = run_arguments(__doc__).parse_args()
    torch.manual_seed(args.seed)
    train, val, vocab = char_splits(args.data)
    model = NanoGPTLike(vocab=vocab, context=RECIPE["context"])
    print(json.dumps(plain_training_run(model, model, (train, val), args.steps, args.seed, recipe_of(args))))


if __name__ == "__main__":
    main()
