"""What the residual schemes of issue 27 cost: train-step time against pre-LN, reslab's mHC and the peers, n = 4.

    python benchmarks/multistream_cost.py              # the table in BENCHMARKS.md (about 8 min on 2 busy cores)
    python benchmarks/multistream_cost.py --quick      # a tiny shape and a few steps: checks that it all runs
    python benchmarks/multistream_cost.py --json       # every figure, machine-readable

Contestants, all built in this one process on the same shape (gpt: learned positions, LayerNorm, 4x GELU MLP,
vocabulary 65, tied head):
- reslab: `pre`, `mhc` (the yardstick of issue 27), then every multi-stream scheme of issue 27 with its stream
  count set to 4 through the option its class names (`ResidualSite.streams_option`), then the single-stream ones;
- the `hyper-connections` package (0.4.11): its dynamic HC, its mHC (20 Sinkhorn iterations) and its
  frac-connections (n = 4 streams of m = 4 fractions), each wrapping reslab's own attention and MLP behind a
  LayerNorm, as pre-LN places them;
- x-transformers (2.31.10, when installed): `Decoder(num_residual_streams=4)` (dynamic HC with a 5-iteration
  Sinkhorn), the same with `gated_multi_residual=True` (its Qwen gated residual) and the 1-stream model.
A step is forward, cross-entropy, backward and AdamW (fused, weight decay 0.1 on matrices) on one fixed batch.
All contestants are warmed up, then timed in rounds: each round runs one window of steps per contestant, in a
rotated order, so a shared machine slows each alike. Reported: median wall and CPU ms/step over the windows, the
ratio to reslab's `pre`, and each issue 27 target with whether this run meets it, judged on CPU time (this
process's, 1 thread: the work a step does, without the time it waits for a core on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import reslab
from reslab.heap import tune_malloc
from reslab.residual import get_scheme
from reslab.train.step import build_adamw
from scheme_cost import measure  # the interleaved (wall, CPU) timer every scheme benchmark shares

STREAMS = 4  # n of the targets
MULTI_STREAM = ("frac", "mhc-lite", "gated-hc", "mhc-v4", "altup")  # issue 27's new multi-stream schemes
SINGLE_STREAM = ("laurel", "olmo2", "mix-ln", "completep", "resi-dual")  # and its single-stream ones
RESLAB = ("pre", "mhc", *MULTI_STREAM, *SINGLE_STREAM)
SINGLE_STREAM_LIMIT = 1.10  # issue 27: a single-stream scheme at most 1.1x `pre`
# peer label -> (package to import, what it is); the builders are in PEER_BUILDERS below
PEERS = {
    "hyper-connections HC": ("hyper_connections", "dynamic HC, n = 4"),
    "hyper-connections mHC": ("hyper_connections", "mHC, n = 4, 20 Sinkhorn iterations"),
    "hyper-connections frac": ("hyper_connections", "frac-connections, n = 4, m = 4"),
    "x-transformers 1 stream": ("x_transformers", "the plain pre-LN Decoder (not a multi-stream peer)"),
    "x-transformers HC": ("x_transformers", "num_residual_streams=4: dynamic HC, 5 Sinkhorn iterations"),
    "x-transformers gated": ("x_transformers", "num_residual_streams=4, gated_multi_residual=True"),
}
SINGLE_STREAM_PEERS = ("x-transformers 1 stream",)
FULL = {"layers": 4, "width": 256, "heads": 4, "context": 128, "vocab_size": 65, "batch": 8}
QUICK = {"layers": 2, "width": 32, "heads": 2, "context": 16, "vocab_size": 65, "batch": 2}


@dataclass
class Shape:
    """The model and batch every contestant is built at."""

    layers: int
    width: int
    heads: int
    context: int
    vocab_size: int
    batch: int


def reslab_options(scheme: str) -> dict:
    """The residual options that give `scheme` STREAMS streams (none for a single-stream scheme)."""
    option = get_scheme(scheme).streams_option
    return {option: STREAMS} if option else {}


def build_reslab(scheme: str, shape: Shape) -> tuple[Callable, nn.Module, torch.optim.Optimizer]:
    """reslab's gpt with `scheme`, and the AdamW `reslab train` builds for it."""
    model = reslab.build_model("gpt", residual=scheme, residual_options=reslab_options(scheme), layers=shape.layers,
                               width=shape.width, heads=shape.heads, context=shape.context,
                               vocab_size=shape.vocab_size)
    optimizer = build_adamw(model, 1e-3, 0.1, (0.9, 0.99), torch.device("cpu"))
    return lambda idx: model(idx).logits, model, optimizer


def plain_adamw(model: nn.Module) -> torch.optim.Optimizer:
    """Fused AdamW with weight decay 0.1 on the matrices only, as reslab's own split does, for the peers."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), fused=True)


def build_hyper_connections(label: str, shape: Shape) -> tuple[Callable, nn.Module]:
    """A gpt whose every residual is the hyper-connections package's module around reslab's own sublayer (behind a
    LayerNorm); the streams are n copies of the embedding, summed before the final norm (the package's reduce)."""
    import hyper_connections as hc
    from reslab.nn import MLP, CausalSelfAttention
    from reslab.nn.norms import LayerNorm

    init_site, expand, reduce = {
        "hyper-connections HC": lambda: hc.get_init_and_expand_reduce_stream_functions(STREAMS),
        "hyper-connections mHC": lambda: hc.mc_get_init_and_expand_reduce_stream_functions(STREAMS, sinkhorn_iters=20),
        "hyper-connections frac": lambda: hc.get_init_and_expand_reduce_stream_functions(STREAMS, num_fracs=4),
    }[label]()
    width, sites = shape.width, nn.ModuleList()
    for layer in range(shape.layers):
        sublayers = (CausalSelfAttention(width, shape.heads, bias=False, dropout=0.0),
                     MLP(width, 4 * width, False, 0.0, "gelu-tanh"))
        for index, sublayer in enumerate(sublayers):
            branch = nn.Sequential(LayerNorm(width, bias=False), sublayer)
            sites.append(init_site(dim=width, branch=branch, layer_index=2 * layer + index))
    model = nn.ModuleDict({"tok": nn.Embedding(shape.vocab_size, width), "pos": nn.Embedding(shape.context, width),
                           "sites": sites, "norm": LayerNorm(width, bias=False),
                           "head": nn.Linear(width, shape.vocab_size, bias=False)})
    model["head"].weight = model["tok"].weight  # tied, as reslab's gpt

    def forward(idx: torch.Tensor) -> torch.Tensor:
        x = expand(model["tok"](idx) + model["pos"](torch.arange(idx.shape[1])))
        for site in model["sites"]:
            x = site(x)
        return model["head"](model["norm"](reduce(x)))

    return forward, model


def build_x_transformers(label: str, shape: Shape) -> tuple[Callable, nn.Module]:
    """x-transformers' decoder LM at the shape; its gated residual gets reslab gated-hc's default rank."""
    from x_transformers import Decoder, TransformerWrapper

    from reslab.residual.gated_hc import default_rank

    residual = {"x-transformers 1 stream": {},
                "x-transformers HC": {"num_residual_streams": STREAMS},
                "x-transformers gated": {"num_residual_streams": STREAMS, "gated_multi_residual": True,
                                         "residual_fn_kwargs": {"read_gate_rank": default_rank(shape.width)}}}[label]
    decoder = Decoder(dim=shape.width, depth=shape.layers, heads=shape.heads,
                      attn_dim_head=shape.width // shape.heads, **residual)
    model = TransformerWrapper(num_tokens=shape.vocab_size, max_seq_len=shape.context, attn_layers=decoder,
                               tie_embedding=True)
    return model, model


def build(label: str, shape: Shape) -> Callable[[], None]:
    """A closure running one training step of contestant `label` on a fixed batch."""
    torch.manual_seed(0)
    if label in RESLAB:
        forward, model, optimizer = build_reslab(label, shape)
    else:
        builder = build_x_transformers if PEERS[label][0] == "x_transformers" else build_hyper_connections
        forward, model = builder(label, shape)
        optimizer = plain_adamw(model)
    tokens = torch.randint(0, shape.vocab_size, (shape.batch, shape.context + 1),
                           generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        loss = F.cross_entropy(forward(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def available_peers() -> tuple[list[str], list[str]]:
    """(peers whose package imports, notes naming the ones left out and how to add them)."""
    import importlib.util

    found, notes = [], []
    for label, (package, _) in PEERS.items():
        if importlib.util.find_spec(package) is not None:
            found.append(label)
        elif not any(package in note for note in notes):
            notes.append(f"{package} is not installed: its rows are left out "
                         f"(pip install {package.replace('_', '-')} -c constraints.txt)")
    return found, notes


def describe(label: str) -> str:
    """What a row is: the scheme and its options, or the peer."""
    if label in RESLAB:
        options = reslab_options(label)
        return f"reslab `{label}`" + "".join(f", {key}={value}" for key, value in options.items())
    return f"{label}: {PEERS[label][1]}"


def verdicts(ms: dict[str, float]) -> dict[str, str]:
    """Each issue 27 target for each new scheme, and whether this run meets it, from the median ms/step `ms`."""
    peers = {label: value for label, value in ms.items() if label in PEERS and label not in SINGLE_STREAM_PEERS}
    out = {}
    for label in MULTI_STREAM:
        checks = [f"<= mhc ({ms['mhc'] / ms['pre']:.2f}x): {'met' if ms[label] <= ms['mhc'] else 'MISSED'}"]
        if peers:
            fastest = min(peers, key=peers.get)
            met = ms[label] < peers[fastest]
            checks.append(f"< fastest peer ({fastest}, {peers[fastest] / ms['pre']:.2f}x): "
                          f"{'met' if met else 'MISSED'}")
        out[label] = "; ".join(checks)
    for label in SINGLE_STREAM:
        ratio = ms[label] / ms["pre"]
        out[label] = f"<= {SINGLE_STREAM_LIMIT:.2f}x: {'met' if ratio <= SINGLE_STREAM_LIMIT else 'MISSED'}"
    return out


def table(rows: list[dict], shape: Shape, args: argparse.Namespace) -> str:
    """The markdown table BENCHMARKS.md shows."""
    lines = [f"gpt shape: {shape.layers} layers, width {shape.width}, {shape.heads} heads, context {shape.context}, "
             f"batch {shape.batch}; {args.threads} thread(s); median of {args.rounds} windows x {args.window} steps",
             "| contestant | ms/step | vs pre | CPU ms/step | CPU vs pre | target (issue 27), on CPU time |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {row['what']} | {row['ms_per_step']:.1f} | {row['vs_pre']:.2f}x | {row['cpu_ms_per_step']:.1f} | "
              f"{row['cpu_vs_pre']:.2f}x | {row['target']} |" for row in rows]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"a tiny shape ({QUICK}), 1 warm-up step, 2 rounds of 1 step: seconds, not minutes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine a second thread mostly waits)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contestant")
    parser.add_argument("--rounds", type=int, default=8, help="timed windows per contestant")
    parser.add_argument("--window", type=int, default=3, help="steps per timed window")
    parser.add_argument("--no-peers", action="store_true", help="reslab's schemes only")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON instead of the table")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.rounds, args.window = 1, 2, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    shape = Shape(**(QUICK if args.quick else FULL))
    torch.set_num_threads(args.threads)
    tune_malloc()  # as `reslab train` does in its own process (reslab.heap)
    peers, notes = ([], []) if args.no_peers else available_peers()
    labels = [*RESLAB, *peers]
    wall, cpu = measure({label: build(label, shape) for label in labels}, args.warmup, args.rounds, args.window)
    ms = {label: statistics.median(wall[label]) for label in labels}
    cpu_ms = {label: statistics.median(cpu[label]) for label in labels}
    targets = verdicts(cpu_ms)  # CPU time: on a shared machine the wall clock also counts waiting for a core
    rows = [{"contestant": label, "what": describe(label), "ms_per_step": ms[label],
             "residual_options": reslab_options(label) if label in RESLAB else None,
             "cpu_ms_per_step": cpu_ms[label], "vs_pre": ms[label] / ms["pre"],
             "cpu_vs_pre": cpu_ms[label] / cpu_ms["pre"], "wall_range_ms": [min(wall[label]), max(wall[label])],
             "target": targets.get(label, "")} for label in labels]
    for note in notes:
        print(note, file=sys.stderr)
    if args.json:
        print(json.dumps({"shape": vars(shape), "threads": args.threads, "rounds": args.rounds,
                          "window": args.window, "torch": torch.__version__, "left_out": notes, "rows": rows},
                         indent=2))
    else:
        print(table(rows, shape, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
