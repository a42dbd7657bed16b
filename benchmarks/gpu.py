"""Training speed on a CUDA GPU: reslab against nanoGPT's model in the same run, bf16 + torch.compile + flash attention.

    python benchmarks/gpu.py [--rounds 3] [--nanogpt ~/src/nanoGPT] [--json gpu.json]
    python benchmarks/gpu.py --smoke --device cpu     # the code path on tiny shapes, anywhere (no figures)

Two shapes: the `gpt` model of the `nanogpt-cpu`/`fast` recipes (4 layers, width 128, context 64) at a GPU batch,
and GPT-2 small (12 layers, 12 heads, width 768, context 1024, vocabulary 50304). reslab runs `reslab.bench.bench`
(the `TrainStep` of `reslab train`: bf16 autocast, compiled, fused AdamW, diagnostics off); nanoGPT runs its own
`model.GPT` from a checkout (`--nanogpt`) or the stand-in `nanogpt_ref.NanoGPTLike`, with nanoGPT's GPU settings
(bf16 autocast, torch.compile, fused AdamW). Attention is pinned to the flash kernel for both. Rounds alternate the
two; the table gives median tokens/s and MFU: 6 x parameters + 12 x layers x width x context FLOPs per token (the
PaLM / nanoGPT formula) over the GPU's dense bf16 peak (from its name; `--peak-tflops` to override).

Without a CUDA device it prints "no CUDA device: skipped" and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHAPES = {  # name -> (model config, batch)
    "gpt recipe (L4 d128 T64)": ({"layers": 4, "heads": 4, "width": 128, "context": 64, "vocab_size": 65}, 256),
    "GPT-2 small (L12 d768 T1024)": ({"layers": 12, "heads": 12, "width": 768, "context": 1024,
                                      "vocab_size": 50304}, 16),
}
SMOKE = {"tiny (smoke test)": ({"layers": 2, "heads": 2, "width": 32, "context": 16, "vocab_size": 65}, 4)}
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L4": 121, "A10": 125, "L40": 181, "4090": 165, "3090": 71}


def gpu_peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of a known GPU, from its name (None when unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def flops_per_token(parameters: int, shape: dict) -> int:
    return 6 * parameters + 12 * shape["layers"] * shape["width"] * shape["context"]


def reslab_run(shape: dict, batch: int, args) -> dict:
    from reslab.bench import bench

    config = {**shape, "bias": False, "dropout": 0.0, "activation": "gelu"}
    result = bench("gpt", config, batch=batch, dtype="bf16", compile=not args.smoke, diagnostics=False,
                   iters=args.iters, windows=args.windows, warmup=args.warmup, device=args.device)
    return {"ms_per_iter": result["ms_per_iter"], "parameters": result["parameters"],
            "compile_seconds": result["compile_seconds"]}


def nanogpt_model(shape: dict, args):
    """nanoGPT's GPT from a checkout (`--nanogpt`), else the stand-in; on the target device."""
    if args.nanogpt:
        sys.path.insert(0, str(Path(args.nanogpt).resolve()))
        from model import GPT, GPTConfig

        config = GPTConfig(block_size=shape["context"], vocab_size=shape["vocab_size"], n_layer=shape["layers"],
                           n_head=shape["heads"], n_embd=shape["width"], dropout=0.0, bias=False)
        model = GPT(config)
        return model, lambda x, y: model(x, y)[1]
    from nanogpt_ref import NanoGPTLike

    model = NanoGPTLike(vocab=shape["vocab_size"], context=shape["context"], width=shape["width"],
                        layers=shape["layers"], heads=shape["heads"])
    return model, model


def nanogpt_run(shape: dict, batch: int, args) -> dict:
    """nanoGPT's GPU iteration: bf16 autocast, compiled model, fused AdamW, clip 1.0; the loss read at the end."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, loss_fn = nanogpt_model(shape, args)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    forward = loss_fn if args.smoke else torch.compile(loss_fn)
    tokens = torch.randint(0, shape["vocab_size"], (batch * 8, shape["context"] + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def iteration(i: int) -> torch.Tensor:
        rows = tokens[(i * batch) % (len(tokens) - batch):][:batch]
        with autocast:
            loss = forward(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    started = time.perf_counter()
    iteration(0).item()
    compile_seconds = time.perf_counter() - started
    return {"ms_per_iter": timed(iteration, args, device), "parameters": sum(p.numel() for p in params),
            "compile_seconds": compile_seconds}


def timed(iteration, args, device: torch.device) -> float:
    """Median ms per iteration over `windows` windows of `iters`, after `warmup`, synchronised at window ends."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(1, args.warmup):
        iteration(i)
    sync()
    windows = []
    for w in range(args.windows):
        start = time.perf_counter()
        for i in range(args.iters):
            iteration(args.warmup + w * args.iters + i)
        sync()
        windows.append((time.perf_counter() - start) / args.iters * 1000)
    return statistics.median(windows)


def flash_only():
    """Pin scaled_dot_product_attention to the flash kernel on CUDA (an error, not a silent fallback, if it cannot)."""
    if not torch.cuda.is_available():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def report(results: dict, shapes: dict, peak: float | None) -> list[str]:
    lines = ["| shape | contestant | ms/iter (median) | rounds | tokens/s | MFU | reslab speed vs nanoGPT "
             "(median of per-round ratios) |", "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for shape_name, (shape, batch) in shapes.items():
        runs = results[shape_name]
        for name in ("reslab", "nanoGPT"):
            ms = [r["ms_per_iter"] for r in runs[name]]
            tokens = batch * shape["context"] / (statistics.median(ms) / 1000)
            mfu = flops_per_token(runs[name][0]["parameters"], shape) * tokens / (peak * 1e12) if peak else None
            ratio = statistics.median(n["ms_per_iter"] / r["ms_per_iter"]
                                      for n, r in zip(runs["nanoGPT"], runs["reslab"], strict=True))
            lines.append(f"| {shape_name}, batch {batch} | {name} | {statistics.median(ms):.2f} | "
                         f"{', '.join(f'{t:.2f}' for t in ms)} | {tokens:,.0f} | "
                         f"{f'{100 * mfu:.1f}%' if mfu else 'n/a'} | {f'{ratio:.2f}x' if name == 'reslab' else ''} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--nanogpt", help="a nanoGPT checkout: time its model.GPT instead of the stand-in")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, no compile: checks the code path only")
    parser.add_argument("--json", help="write every round's figures here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    shapes = SMOKE if args.smoke else SHAPES
    peak = args.peak_tflops or gpu_peak_tflops(torch.device(args.device))
    results = {name: {"reslab": [], "nanoGPT": []} for name in shapes}
    with flash_only():
        for round_ in range(args.rounds):
            for name, (shape, batch) in shapes.items():
                for contestant, run in (("reslab", reslab_run), ("nanoGPT", nanogpt_run))[::1 - 2 * (round_ % 2)]:
                    results[name][contestant].append(run(shape, batch, args))
                    print(f"round {round_ + 1} {name} {contestant}: "
                          f"{results[name][contestant][-1]['ms_per_iter']:.2f} ms/iter", flush=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"\n{device_name}, torch {torch.__version__}, bf16 peak {peak or 'unknown'} TFLOP/s\n")
    print("\n".join(report(results, shapes, peak)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
