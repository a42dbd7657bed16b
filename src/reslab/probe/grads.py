"""Per-parameter gradient norms with one foreach call, and the clipping that reuses them."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from reslab._torch_compat import foreach_mul_, foreach_norm

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


@dataclass
class GradientNorms:
    per_parameter: dict[str, float]
    total: float
    per_block: list[float]  # L2 norm of all gradients inside blocks.i

    @property
    def first_layer_share(self) -> float | None:
        """Gradient norm of block 0 over that of the last block: how much signal reaches the bottom."""
        if len(self.per_block) < 1 or self.per_block[-1] == 0:
            return None
        return self.per_block[0] / self.per_block[-1]

    @classmethod
    def from_values(cls, names: list[str], values: list[float], total: float) -> GradientNorms:
        """From per-parameter norms (however computed, e.g. over shards) and their total."""
        per_parameter = dict(zip(names, values))
        blocks: dict[int, float] = {}
        for name, value in per_parameter.items():
            match = _BLOCK.search(name)
            if match:
                blocks[int(match.group(1))] = blocks.get(int(match.group(1)), 0.0) + value * value
        return cls(per_parameter, total, [blocks[i] ** 0.5 for i in sorted(blocks)])

    def to_metrics(self) -> dict:
        return {"grad_norm_total": self.total, "grad_norms": self.per_parameter, "block_grad_norms": self.per_block,
                "first_layer_grad_share": self.first_layer_share}


def gradient_norms(model: nn.Module, clip: float = 0.0) -> GradientNorms:
    """L2 norm of every parameter's gradient (before clipping), their total, and per-block norms.

    All norms come from a single `foreach_norm` and one device-to-host copy. When `clip > 0` the gradients
    are then scaled in place exactly as `clip_grad_norm_` would, reusing the total instead of computing it twice.
    """
    named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    if not named:
        return GradientNorms({}, 0.0, [])
    grads = [g for _, g in named]
    norms = torch.stack(foreach_norm(grads)).float()
    total = torch.linalg.vector_norm(norms)
    if clip > 0:
        foreach_mul_(grads, torch.clamp(clip / (total + 1e-6), max=1.0).to(grads[0].dtype))
    return GradientNorms.from_values([name for name, _ in named], norms.tolist(), total.item())
