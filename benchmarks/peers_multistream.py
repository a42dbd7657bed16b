"""Multi-stream residuals against the peers a user would pick instead, on the same model shape, n = 4 streams.

    python benchmarks/peers_multistream.py                  # the gpt CPU shape, every contestant
    python benchmarks/peers_multistream.py --rounds 12 --contestants reslab-mhc,lucidrains-mhc

Contestants (each in its own process, started by this script, all alive at once and timed one window at a time in
rotated order, so a shared machine slows each alike):
- reslab-pre, reslab-hc (static), reslab-hc-dynamic, reslab-mhc: `reslab.build_model('gpt', residual=...)`;
- lucidrains-mhc: the `hyper-connections` package's ManifoldConstrainedHyperConnections (20 Sinkhorn iterations)
  around the same attention and MLP sublayers (reslab's modules, each behind a LayerNorm, as in pre-LN);
- xtransformers-pre, xtransformers-hc4: x-transformers' `TransformerWrapper` + `Decoder(num_residual_streams=4)`
  (its HyperConnection: dynamic weights, a 5-iteration Sinkhorn mix).
Same shape (4 layers, width 128, 4 heads of 32, context 64, vocabulary 65, batch 12), same step: forward,
cross-entropy, backward, torch.optim.AdamW (lr 1e-3, betas (0.9, 0.99), weight decay 0.1), on one fixed batch.
Reported: median ms/step over the windows, and the median over rounds of each contestant's ratio to reslab-pre.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CONTESTANTS = ("reslab-pre", "reslab-hc", "reslab-hc-dynamic", "reslab-mhc", "lucidrains-mhc", "xtransformers-pre",
               "xtransformers-hc4")
SHAPE = {"layers": 4, "width": 128, "heads": 4, "context": 64, "vocab_size": 65}
STREAMS = 4


def reslab_model(name: str):
    import reslab

    scheme, options = {"reslab-pre": ("pre", {}), "reslab-hc": ("hc", {}),
                       "reslab-hc-dynamic": ("hc", {"hc_dynamic": True}), "reslab-mhc": ("mhc", {})}[name]
    model = reslab.build_model("gpt", residual=scheme, residual_options=options, **SHAPE)
    return lambda idx: model(idx).logits, model


def lucidrains_model():
    """A gpt of reslab's sublayers with each residual replaced by the package's mHC module."""
    import torch
    import torch.nn as nn
    from hyper_connections.manifold_constrained_hyper_connections import (
        get_init_and_expand_reduce_stream_functions,
    )

    from reslab.nn.attention import CausalSelfAttention
    from reslab.nn.ffn import MLP

    width = SHAPE["width"]
    init_site, expand, reduce = get_init_and_expand_reduce_stream_functions(STREAMS, sinkhorn_iters=20)
    sites = nn.ModuleList()
    for layer in range(SHAPE["layers"]):
        for index, sublayer in enumerate([CausalSelfAttention(width, SHAPE["heads"], bias=False, dropout=0.0),
                                          MLP(width, 4 * width, False, 0.0, "gelu-tanh")]):
            sites.append(init_site(dim=width, branch=nn.Sequential(nn.LayerNorm(width, bias=False), sublayer),
                                   layer_index=2 * layer + index))
    model = nn.ModuleDict({"tok": nn.Embedding(SHAPE["vocab_size"], width),
                           "pos": nn.Embedding(SHAPE["context"], width), "sites": sites,
                           "norm": nn.LayerNorm(width, bias=False),
                           "head": nn.Linear(width, SHAPE["vocab_size"], bias=False)})

    def forward(idx):
        x = expand(model["tok"](idx) + model["pos"](torch.arange(idx.shape[1])))
        for site in model["sites"]:
            x = site(x)
        return model["head"](model["norm"](reduce(x)))

    return forward, model


def xtransformers_model(streams: int):
    from x_transformers import Decoder, TransformerWrapper

    model = TransformerWrapper(num_tokens=SHAPE["vocab_size"], max_seq_len=SHAPE["context"],
                               attn_layers=Decoder(dim=SHAPE["width"], depth=SHAPE["layers"], heads=SHAPE["heads"],
                                                   attn_dim_head=SHAPE["width"] // SHAPE["heads"],
                                                   num_residual_streams=streams))
    return model, model


def build(name: str):
    if name.startswith("reslab-"):
        return reslab_model(name)
    if name == "lucidrains-mhc":
        return lucidrains_model()
    return xtransformers_model(STREAMS if name.endswith("hc4") else 1)


def worker(name: str, batch: int, threads: int) -> None:
    """Build the contestant, then answer each line `STEPS` on stdin with the ms/step of that many steps."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    forward, model = build(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    tokens = torch.randint(0, SHAPE["vocab_size"], (batch, SHAPE["context"] + 1),
                           generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        loss = F.cross_entropy(forward(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    print("ready", flush=True)
    for line in sys.stdin:
        steps = int(line)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        print((time.perf_counter() - start) / steps * 1e3, flush=True)


def command(proc: subprocess.Popen, steps: int) -> float:
    proc.stdin.write(f"{steps}\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())


def run(names: list[str], args) -> dict[str, list[float]]:
    """Start every contestant, warm each up, then time one window each per round in rotated order."""
    procs = {name: subprocess.Popen([sys.executable, __file__, "--worker", name, "--batch", str(args.batch),
                                     "--threads", str(args.threads)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True) for name in names}
    try:
        for name, proc in procs.items():
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit(f"contestant {name} failed to start")
            command(proc, args.warmup)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(command(procs[name], args.window))
        return times
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contestants", default=",".join(CONTESTANTS))
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.batch, args.threads)
        return 0
    names = args.contestants.split(",")
    times = run(names, args)
    base = names[0]
    rows = [{"contestant": name, "ms_per_step": statistics.median(times[name]),
             "vs_first": statistics.median(t / b for t, b in zip(times[name], times[base], strict=True)),
             "ratios": [round(t / b, 3) for t, b in zip(times[name], times[base], strict=True)]} for name in names]
    if args.json:
        print(json.dumps({"shape": SHAPE, "batch": args.batch, "threads": args.threads, "rows": rows}, indent=2))
        return 0
    print(f"{SHAPE}, batch {args.batch}, {args.threads} thread(s), {args.rounds} rounds x {args.window} steps")
    print(f"| contestant | ms/step | vs {base} (median of per-round ratios) |")
    print("| --- | ---: | ---: |")
    for row in rows:
        print(f"| {row['contestant']} | {row['ms_per_step']:.1f} | {row['vs_first']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
