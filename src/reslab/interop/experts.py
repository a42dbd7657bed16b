"""Mixture-of-experts checkpoint files: one tensor per expert on disk, stacked tensors in HF's modules.

HF's MoE modules (Mixtral, Qwen3-MoE, DeepSeek-V3, ...) hold each layer's experts as two stacks,
`mlp.experts.gate_up_proj` (experts, 2 hidden, width; gate rows then up rows) and `mlp.experts.down_proj`; their
files keep the original per-expert tensors: `mlp.experts.{e}.gate_proj.weight` (Qwen, DeepSeek) or Mixtral's
`block_sparse_moe.experts.{e}.w1.weight` (w1 gate, w3 up, w2 down) beside `block_sparse_moe.gate.weight`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

PER_EXPERT = re.compile(r"(.*)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                        r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
ROLES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def stack_experts(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with every layer's per-expert tensors replaced by HF's stacks (and Mixtral's `block_sparse_moe`
    renamed `mlp`); tensors already stacked pass through."""
    layers: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for key, tensor in tensors.items():
        match = PER_EXPERT.fullmatch(key)
        if match:
            role = ROLES.get(match[3], match[3])
            layers.setdefault(match[1], {}).setdefault(int(match[2]), {})[role] = tensor
        else:
            out[key.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = tensor
    for layer, experts in layers.items():
        ordered = [experts[e] for e in sorted(experts)]
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([e["gate_proj"], e["up_proj"]])
                                                                for e in ordered])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([e["down_proj"] for e in ordered])
    return out
