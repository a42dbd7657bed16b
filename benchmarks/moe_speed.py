"""Dense vs mixture-of-experts training speed at equal active parameters (llama, `--moe-experts`).

    python benchmarks/moe_speed.py                  # dense FFN vs 8 experts top-2 vs 4 experts top-1, CPU
    python benchmarks/moe_speed.py --device cuda    # the same on a GPU

Every variant activates the same FFN matmul weights per token: the dense SwiGLU has hidden H, each MoE expert a
hidden h with top_k * h = H (plus the router's experts x width).
A step is forward + backward + AdamW on one fixed batch; timing as in scheme_cost.py (rotated windows, median).
What it measures: the price of routing (router, sort, gather, per-expert matmuls on small slices, scatter-add)
against one large GEMM, at the same arithmetic per token. Total parameters grow with the expert count.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from scheme_cost import measure

import reslab
from reslab.contracts import attention_sublayers
from reslab.train.step import build_adamw

# label -> llama overrides besides the shared shape; `H` is replaced by the dense FFN hidden size
VARIANTS: dict[str, dict] = {
    "dense": {"ffn_hidden": "H"},
    "moe-8x-top2": {"moe_experts": 8, "moe_top_k": 2, "ffn_hidden": "H/2"},
    "moe-4x-top1": {"moe_experts": 4, "moe_top_k": 1, "ffn_hidden": "H"},
}


def variant_config(variant: dict, hidden: int) -> dict:
    sizes = {"H": hidden, "H/2": hidden // 2}
    return {key: sizes.get(value, value) if isinstance(value, str) else value for key, value in variant.items()}


def build_step(config: dict, batch: int, device: torch.device):
    torch.manual_seed(0)
    model = reslab.build_model("llama", **config).to(device)
    optimizer = build_adamw(model, 1e-3, 0.1, (0.9, 0.99), device)
    tokens = torch.randint(0, 65, (batch, config["context"] + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    def step() -> None:
        out = model(x)
        loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten()) + sum(out.aux_losses.values(), 0.0) * 0.01
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, model


def active_weights(model) -> float:
    """Matmul weights one token uses: the model's FLOPs per token / 6, less the attention-score term."""
    attention = sum(12 * a.heads * a.head_dim for a in attention_sublayers(model))  # at a context of 1
    return (model.flops_per_token(1) - attention) / 6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=384, help="the dense FFN's hidden size H")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = {"layers": args.layers, "width": args.width, "heads": 4, "kv_heads": 2, "context": args.context}
    built = {label: build_step({**shape, **variant_config(v, args.hidden)}, args.batch, device)
             for label, v in VARIANTS.items()}
    wall, cpu = measure({label: step for label, (step, _) in built.items()}, args.warmup, args.rounds, args.window)
    tokens, base = args.batch * args.context, statistics.median(wall["dense"])
    rows = [{"variant": label, "parameters": sum(p.numel() for p in model.parameters()),
             "active_matmul_weights": active_weights(model), "ms_per_step": statistics.median(wall[label]),
             "tokens_per_second": tokens / statistics.median(wall[label]) * 1e3,
             "vs_dense": statistics.median(wall[label]) / base} for label, (_, model) in built.items()]
    if args.json:
        print(json.dumps({"config": {**shape, **vars(args)}, "rows": rows}, indent=2))
        return 0
    print(f"llama: {args.layers} layers, width {args.width}, dense hidden {args.hidden}, context {args.context}, "
          f"batch {args.batch}, {args.device}, {args.threads} thread(s); median of {args.rounds} x {args.window} steps")
    print("| variant | parameters | active matmul weights | ms/step | tokens/s | vs dense |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['variant']} | {row['parameters']:,} | {row['active_matmul_weights']:,.0f} | "
              f"{row['ms_per_step']:.1f} | {row['tokens_per_second']:,.0f} | {row['vs_dense']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
