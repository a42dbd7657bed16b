"""Position-wise feed-forward layers: ReLU (the original Transformer), the GPT MLP (GPT-2), SwiGLU (Llama)."""

import functools
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class _TwoLayerFFN(nn.Module):
    """width -> hidden -> activation -> width, with dropout on the output."""

    def __init__(self, width: int, hidden: int, activation: nn.Module, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.up = nn.Linear(width, hidden, bias=bias)
        self.act = activation
        self.down = nn.Linear(hidden, width, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.act(self.up(x))))

    @property
    def output_projection(self) -> nn.Linear:
        return self.down

    def branch_weights(self) -> list[tuple[str, torch.Tensor]]:
        return [("ffn", self.up.weight), ("ffn", self.down.weight)]


class ReluFFN(_TwoLayerFFN):
    """Vaswani et al. 2017: max(0, x W1 + b1) W2 + b2."""

    def __init__(self, width: int, hidden: int, bias: bool = True, dropout: float = 0.0):
        super().__init__(width, hidden, nn.ReLU(), bias, dropout)


class ReLUSquared(nn.Module):
    """relu(x)^2 (So et al. 2021, Primer, arXiv 2109.08668; used by modded-nanogpt)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


# The MLP activations by name. GPT-2 uses the tanh approximation; nanoGPT the exact GELU, which is also cheaper
# on CPU (forward + backward 1.1 against 1.8 ms at 768 x 512, torch 2.13).
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu-tanh": functools.partial(nn.GELU, approximate="tanh"),
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "relu2": ReLUSquared,
}


class MLP(_TwoLayerFFN):
    """GPT-2's MLP: width -> hidden -> activation -> width; GELU with the tanh approximation ("gelu_new") by default."""

    def __init__(self, width: int, hidden: int, bias: bool = True, dropout: float = 0.0,
                 activation: str = "gelu-tanh"):
        super().__init__(width, hidden, ACTIVATIONS[activation](), bias, dropout)


def swiglu(gate_up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """silu(gate) * up of the fused [gate | up] pre-activations. With `limit`, DeepSeek-V4's clamp first: gate at
    most `limit`, up within [-limit, limit] (transformers 5.25 `DeepseekV4MLP.forward`, `swiglu_limit`)."""
    gate, up = gate_up.chunk(2, dim=-1)
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """Shazeer 2020 (arXiv 2002.05202): down(silu(gate(x)) * up(x)); gate and up fused in one matmul. `limit`:
    DeepSeek-V4's clamp of the pre-activations (`swiglu`)."""

    def __init__(self, width: int, hidden: int, bias: bool = False, dropout: float = 0.0, limit: float | None = None):
        super().__init__()
        self.hidden, self.limit = hidden, limit
        self.gate_up = nn.Linear(width, 2 * hidden, bias=bias)
        self.down = nn.Linear(hidden, width, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(swiglu(self.gate_up(x), self.limit)))

    @property
    def output_projection(self) -> nn.Linear:
        return self.down

    def branch_weights(self) -> list[tuple[str, torch.Tensor]]:
        return [("ffn", self.gate_up.weight), ("ffn", self.down.weight)]
