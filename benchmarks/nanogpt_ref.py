"""A stand-in for nanoGPT's CPU training iteration, so reslab's speed can be compared with it in the same process.

It reproduces the computation nanoGPT (Karpathy, github.com/karpathy/nanoGPT) runs for its shakespeare-char CPU
recipe, written here from that description: pre-LN blocks with bias-free LayerNorms, one fused qkv projection,
`scaled_dot_product_attention(is_causal=True)`, a 4x MLP with the exact GELU, a tied head, cross-entropy over the
flattened logits; AdamW with weight decay on matrices only and torch's default implementation on CPU (nanoGPT asks
for the fused kernel on CUDA only); gradient clipping at 1.0 and `zero_grad(set_to_none=True)`; a batch of random
windows stacked from a uint16 array per iteration; the loss read back every iteration (its CPU recipe logs every
step). Nothing of it is used by reslab itself.
"""

from __future__ import annotations

import math
import time

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
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
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
