"""Causal multi-head attention with optional grouped-query heads, RoPE and per-head QK RMSNorm.

One class covers GPT-2 (MHA, learned positions outside), Llama/MiniMind (GQA + RoPE) and Qwen3 (+ QK-norm).
Attention itself is `F.scaled_dot_product_attention` with a causal mask: no Python loop over tokens.
"""

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.nn.norms import RMSNorm
from reslab.nn.rope import RotaryEmbedding


class CausalSelfAttention(nn.Module):
    is_attention = True  # reslab.contracts.Attention (heads, head_dim, kv_heads); ValueMixing too (`value_mix`)
    takes_kv_inputs = True  # forward(x, key_input=, value_input=): keys and values from their own streams (MUDD)

    def __init__(
        self,
        width: int,
        heads: int,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        rope_theta: float | None = None,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads or heads
        self.head_dim = head_dim or width // heads
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        # q, k and v in one matmul: one large GEMM is faster than three small ones on CPU.
        self.qkv = nn.Linear(width, q_size + 2 * kv_size, bias=bias)
        self.out = nn.Linear(q_size, width, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.rope = RotaryEmbedding(self.head_dim, rope_theta) if rope_theta else None
        self.dropout = dropout
        self.out_dropout = nn.Dropout(dropout)
        self.split_sizes = (q_size, kv_size, kv_size)
        # values (batch, kv_heads, seq, head_dim) -> values: set by a residual scheme that mixes values across
        # layers (ResFormer's value residual, via `init_branch`); None: the values are used as computed
        self.value_mix: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, key_input: torch.Tensor | None = None,
                value_input: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of `x` over itself; with `key_input` or `value_input` (same shape as `x`), the keys or the
        values are computed from that stream instead (MUDDFormer's separate Q, K, V inputs). None: from `x`."""
        batch, seq, _ = x.shape
        if key_input is None and value_input is None:
            q, k, v = self.qkv(x).split(self.split_sizes, dim=-1)
        else:
            q, k, v = self.project_apart(x, key_input, value_input)
        q = q.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.value_mix is not None:
            v = self.value_mix(v)
        if self.q_norm is not None:  # Qwen3: normalise each head's q and k before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        y = self.attend(q, k, v)
        y = y.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim)
        return self.out_dropout(self.out(y))

    def project_apart(self, x: torch.Tensor, key_input: torch.Tensor | None,
                      value_input: torch.Tensor | None) -> list[torch.Tensor]:
        """q from `x`, k from `key_input`, v from `value_input` (each `x` where None), with the q, k and v row
        slices of the fused `qkv` matrix and bias: the same weights as the one-input path, three matmuls."""
        weights = self.qkv.weight.split(self.split_sizes, dim=0)
        biases = self.qkv.bias.split(self.split_sizes) if self.qkv.bias is not None else (None, None, None)
        inputs = (x, x if key_input is None else key_input, x if value_input is None else value_input)
        return [F.linear(i, w, b) for i, w, b in zip(inputs, weights, biases)]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return causal_attention(q, k, v, self.dropout if self.training else 0.0, gqa=self.kv_heads != self.heads)

    @property
    def output_projection(self) -> nn.Linear:
        """The matrix that writes into the residual stream (GPT-2 scales its init by 1/sqrt(2L))."""
        return self.out

    def branch_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The branch's weight matrices by role (views into the fused qkv), for schemes that set their own init."""
        q, k, v = self.qkv.weight.split(self.split_sizes, dim=0)
        return [("q", q), ("k", k), ("v", v), ("out", self.out.weight)]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0,
                     scale: float | None = None, gqa: bool = False) -> torch.Tensor:
    """Causal scaled dot-product attention over (batch, heads, seq, dim) tensors."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # torch's CPU flash attention runs 4.6x slower in bf16 than in fp32 (forward + backward at nanoGPT's
        # CPU shape, torch 2.13), and attention is a small share of the FLOPs: run it in fp32.
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, dropout_p=dropout,
                                               scale=scale, enable_gqa=gqa)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale, enable_gqa=gqa)
