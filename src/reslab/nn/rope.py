"""Rotary position embedding (Su et al. 2021, arXiv 2104.09864), in the half-split layout Llama and Qwen use."""

import torch
import torch.nn as nn


class RotaryEmbedding(nn.Module):
    """Rotates query/key channel pairs (i, i + d/2) by angle pos * theta^(-2i/d).

    `interleaved`: the pairs are (2i, 2i + 1) instead, as DeepSeek's reference code lays them out; the rotated pairs
    are returned in the half-split layout (even channels first), which leaves q . k unchanged when both are rotated
    (HF's `rope_interleave`). The cos/sin tables are computed lazily for the sequence length seen and cached (not
    saved in checkpoints).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, interleaved: bool = False):
        super().__init__()
        self.interleaved = interleaved
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.device, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def tables(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self._cache
        if cache is None or cache[0] < seq_len or cache[1] != device or cache[2] != dtype:
            pos = torch.arange(seq_len, device=device, dtype=torch.float32)
            angles = torch.outer(pos, self.inv_freq.to(device))
            angles = torch.cat([angles, angles], dim=-1)
            cache = (seq_len, device, dtype, angles.cos().to(dtype), angles.sin().to(dtype))
            if not torch.compiler.is_compiling():
                self._cache = cache
        return cache[3][:seq_len], cache[4][:seq_len]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, heads, seq, head_dim)."""
        cos, sin = self.tables(x.shape[-2], x.device, x.dtype)
        half = x.shape[-1] // 2
        if self.interleaved:
            cos, sin, even, odd = cos[..., :half], sin[..., :half], x[..., 0::2], x[..., 1::2]
            return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin
