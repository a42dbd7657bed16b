"""LayerNorm (optional bias, as in nanoGPT) and RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467)."""

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm(nn.Module):
    """LayerNorm whose bias can be switched off (PyTorch's could not before 2.1; kept for clear state-dict names)."""

    def __init__(self, width: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x / rms(x) * weight. Statistics in fp32 as Llama does, so bf16 runs normalise the same way."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype) * self.weight


NormFactory = Callable[[int], nn.Module]


def make_norm(kind: str, bias: bool = True, eps: float = 1e-5) -> NormFactory:
    """A factory `width -> norm module`, so residual schemes can create the model's kind of norm."""
    if kind == "layernorm":
        return lambda width: LayerNorm(width, bias=bias, eps=eps)
    if kind == "rmsnorm":
        return lambda width: RMSNorm(width, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; choose layernorm or rmsnorm")
