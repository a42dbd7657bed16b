"""`reslab bench`: steady-state training speed of a model config, and how close it gets to this machine's peak.

It times the same `TrainStep` that `reslab train` runs (forward, backward, clip, optimizer step) on random tokens,
after warm-up, as the median over repeated timed windows, and compares the achieved FLOP rate (from the model's own
FLOP formula, `LanguageModel.flops_per_token`) with a matmul peak measured on the spot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import TYPE_CHECKING, Any

from reslab.cli_args import add_model_arguments, model_name, model_overrides
from reslab.checks import check_positive

if TYPE_CHECKING:  # torch is imported where it is used, so `reslab bench --help` starts fast
    import torch


def matmul_peak_gflops(dtype: torch.dtype | None = None, size: int = 1024, repeats: int = 20) -> float:
    """Median GFLOP/s of a square matmul (default fp32): the practical ceiling a training step can approach here."""
    import torch

    dtype = dtype or torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def _time_windows(step, batch_at, sync, warmup: int, windows: int, iters: int, log_interval: int
                  ) -> tuple[float, list[float]]:
    """(seconds of the first step, ms/iter of each timed window); diagnostics every `log_interval` (0: never)."""
    start = time.perf_counter()
    step(*batch_at(0))
    sync()
    first_step = time.perf_counter() - start
    for i in range(1, warmup):
        step(*batch_at(i), diagnostics=bool(log_interval) and i % log_interval == 0)
    sync()
    window_ms = []
    counter = 0
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(iters):
            counter += 1
            step(*batch_at(counter), diagnostics=bool(log_interval) and counter % log_interval == 0)
        sync()
        window_ms.append((time.perf_counter() - start) / iters * 1000)
    return first_step, window_ms


def bench(model: str, overrides: dict[str, Any], batch: int = 12, dtype: str = "auto", compile: bool = False,
          optimizer: str = "adamw", diagnostics: bool = True, log_interval: int = 50, warmup: int = 10,
          iters: int = 20, windows: int = 5, device: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Time training iterations; diagnostics (when on) run every `log_interval` iterations, as in training."""
    import torch

    from reslab.models import build_model
    from reslab.train.config import TrainConfig
    from reslab.train.config import resolve_device
    from reslab.train.step import TrainStep, build_optimizer

    check_positive(batch=batch, iters=iters, windows=windows, log_interval=log_interval)
    torch.manual_seed(seed)
    target = resolve_device(device)
    net = build_model(model, **overrides).to(target)
    context = net.config.context
    config = TrainConfig(model=model, optimizer=optimizer, dtype=dtype)
    step = TrainStep(net, build_optimizer(config, net, target), config.grad_clip, target, dtype, compile)
    dtype = step.dtype  # auto resolved for this device
    tokens = torch.randint(0, net.config.vocab_size, (batch * 64, context + 1), device=target)

    def batch_at(i: int):
        rows = tokens[(i * batch) % (len(tokens) - batch):][:batch]
        return rows[:, :-1], rows[:, 1:]

    def sync():
        if target.type == "cuda":
            torch.cuda.synchronize()

    first_step, window_ms = _time_windows(step, batch_at, sync, warmup, windows, iters,
                                          log_interval if diagnostics else 0)
    ms = statistics.median(window_ms)
    flops = net.flops_per_token(context) * batch * context
    peak = matmul_peak_gflops(torch.bfloat16 if dtype == "bf16" else torch.float32) if target.type == "cpu" else None
    achieved = flops / (ms / 1000) / 1e9
    return {
        "model": model, "config": net.config.to_dict(), "batch": batch, "dtype": dtype, "compiled": step.compiled,
        "optimizer": optimizer, "diagnostics": diagnostics, "log_interval": log_interval,
        "threads": torch.get_num_threads(), "device": str(target),
        "ms_per_iter": ms, "ms_per_iter_windows": window_ms, "tokens_per_second": batch * context / (ms / 1000),
        "gflop_per_iter": flops / 1e9, "achieved_gflops": achieved, "peak_gflops": peak,
        "fraction_of_peak": achieved / peak if peak else None,
        "first_step_seconds": first_step, "compile_seconds": step.compile_seconds if step.compiled else 0.0,
        "parameters": sum(p.numel() for p in net.parameters()),
    }


def register(commands) -> None:
    parser = commands.add_parser("bench", help="measure training speed (ms/iter, tokens/s, GFLOP/s vs peak)")
    add_model_arguments(parser, default_model="gpt")
    parser.add_argument("--batch", type=int, default=12, help="sequences per iteration (default 12)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto (default): bf16 autocast where the hardware runs it natively, else fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"],
                        help="adamw (default) or muon (Muon for hidden matrices, AdamW for the rest)")
    parser.add_argument("--no-diagnostics", action="store_true", help="no gradient norms / stream probes")
    parser.add_argument("--log-interval", type=int, default=50, help="diagnostics every N iterations (default 50)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed iterations first (default 10)")
    parser.add_argument("--iters", type=int, default=20, help="iterations per timed window (default 20)")
    parser.add_argument("--windows", type=int, default=5, help="timed windows; the median is reported (default 5)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--device", default="auto", help="torch device the model runs on: auto (default: cuda if "
                        "present), cpu, cuda, cuda:N")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.threads is not None:
        import torch

        check_positive(**{"--threads": args.threads})
        torch.set_num_threads(args.threads)
    result = bench(model_name(args), model_overrides(args), batch=args.batch, dtype=args.dtype, compile=args.compile,
                   optimizer=args.optimizer, diagnostics=not args.no_diagnostics, log_interval=args.log_interval,
                   warmup=args.warmup, iters=args.iters, windows=args.windows, device=args.device)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    config = result["config"]
    print(f"{result['model']} L{config['layers']} d{config['width']} h{config['heads']} T{config['context']} "
          f"batch {result['batch']} {result['dtype']}{' compiled' if result['compiled'] else ''} "
          f"{result['optimizer']} diagnostics "
          f"{'every ' + str(result['log_interval']) if result['diagnostics'] else 'off'}"
          f" ({result['threads']} threads, {result['device']})")
    print(f"  {result['ms_per_iter']:.2f} ms/iter (median of {len(result['ms_per_iter_windows'])} windows: "
          + ", ".join(f"{w:.1f}" for w in result["ms_per_iter_windows"]) + ")")
    print(f"  {result['tokens_per_second']:,.0f} tokens/s, {result['gflop_per_iter']:.2f} GFLOP/iter, "
          f"{result['achieved_gflops']:.1f} GFLOP/s achieved")
    if result["peak_gflops"]:
        print(f"  matmul peak here {result['peak_gflops']:.1f} GFLOP/s -> "
              f"{100 * result['fraction_of_peak']:.0f}% of peak")
    if result["compiled"]:
        print(f"  compile (first step): {result['compile_seconds']:.1f} s, not included above")
    return 0
