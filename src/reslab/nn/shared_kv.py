"""DeepSeek-V4's attention (transformers 5.25 `models/deepseek_v4`, `DeepseekV4Attention`, lines 764-881): one
key-value head that is both key and value, partial interleaved RoPE, per-head attention sinks, a sliding window and
a grouped low-rank output projection.

    c_q = RMSNorm(x W_qa)                 q = RMS(c_q W_qb)  per head, no gain     (q_lora_rank; heads x head_dim)
    kv  = RMSNorm(x W_kv)                 one head of head_dim, read as key AND value
    RoPE on the last `rope_dim` channels of q and kv, pairs (2i, 2i + 1) in place (V4's interleaved layout)
    p   = softmax([q kv^T / sqrt(head_dim) | sink_h])  without the sink column; keys within the window, causal
    o   = p kv, then the inverse rotation (angle -pos) of o's rope slice at the query's position: kv carried the
          key's rotation into the values, so each value contributes by its relative distance only
    out = W_ob [W_oa^(1) o_1, ..., W_oa^(g) o_g]   heads split in g groups, each projected to o_lora_rank

The window: a query at position i sees keys j with i - window < j <= i (`sliding_window`, HF's sliding mask).
V4's compressed attention branches (CSA / HCA layers) are not built here; reslab's `deepseek-v4` refuses them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.nn.norms import RMSNorm
from reslab.nn.rope import RotaryEmbedding


class GroupedLinear(nn.Linear):
    """`groups` independent maps, stored as one (groups * out, in) matrix (HF's `DeepseekV4GroupedLinear`, whose
    layout this keeps): input (..., groups, in) -> (..., groups, out), group i through rows [i out, (i+1) out)."""

    def __init__(self, in_per_group: int, out_per_group: int, groups: int):
        super().__init__(in_per_group, groups * out_per_group, bias=False)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_group = self.weight.view(self.groups, -1, self.in_features)  # (groups, out, in)
        return torch.einsum("...gi,goi->...go", x, per_group)


def rotate_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last 2 * cos.shape[-1] channels of x (..., seq, dim) pairwise, (2i, 2i + 1) in place, by the
    angles whose cos and sin are (seq, pairs); the leading channels pass unchanged. In fp32, as V4 rotates."""
    rope_dim = 2 * cos.shape[-1]
    plain, rope = x[..., :-rope_dim], x[..., -rope_dim:].float()
    even, odd = rope[..., 0::2], rope[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat([plain, rotated.to(x.dtype)], dim=-1)


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last axis, no gain (V4's `DeepseekV4UnweightedRMSNorm`)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class SharedKVAttention(nn.Module):
    """DeepSeek-V4's shared-KV multi-query attention with sinks (the module docstring has the formulas)."""

    is_attention = True  # reslab.contracts.Attention; ValueMixing too (`value_mix`)
    takes_kv_inputs = True  # forward(x, key_input=, value_input=): keys and values from their own streams (MUDD)

    def __init__(self, width: int, heads: int, head_dim: int, q_lora_rank: int, rope_dim: int, rope_theta: float,
                 out_groups: int, out_rank: int, window: int, dropout: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, 1, head_dim
        self.window, self.eps, self.dropout = window, norm_eps, dropout
        self.q_down = nn.Linear(width, q_lora_rank, bias=False)
        self.q_norm = RMSNorm(q_lora_rank, eps=norm_eps)
        self.q_up = nn.Linear(q_lora_rank, heads * head_dim, bias=False)
        self.kv = nn.Linear(width, head_dim, bias=False)
        self.kv_norm = RMSNorm(head_dim, eps=norm_eps)
        self.out_groups = GroupedLinear(heads * head_dim // out_groups, out_rank, out_groups)
        self.out = nn.Linear(out_groups * out_rank, width, bias=False)
        self.sinks = nn.Parameter(torch.zeros(heads))  # V4 initialises them to 0 (`_init_weights`)
        self.rope = RotaryEmbedding(rope_dim, rope_theta) if rope_dim else None
        self.out_dropout = nn.Dropout(dropout)
        # values (batch, 1, seq, head_dim) -> values: set by a scheme that mixes values across layers
        self.value_mix: Callable[[torch.Tensor], torch.Tensor] | None = None

    def shared_kv(self, x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The one key-value head of `x`, rotated: (batch, 1, seq, head_dim)."""
        kv = self.kv_norm(self.kv(x)).unsqueeze(1)
        return kv if angles is None else rotate_tail(kv, *angles)

    def forward(self, x: torch.Tensor, key_input: torch.Tensor | None = None,
                value_input: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of `x` over itself; `key_input` / `value_input` (same shape): keys or values from that stream
        (MUDDFormer's separate inputs; one head each). None: both are `x`'s shared head, as in V4."""
        batch, seq, _ = x.shape
        angles = self.angles(seq, x.device)
        q = self.q_up(self.q_norm(self.q_down(x))).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        q = unit_rms(q, self.eps)
        q = q if angles is None else rotate_tail(q, *angles)
        k = self.shared_kv(x if key_input is None else key_input, angles)
        v = k if value_input is None else self.shared_kv(value_input, angles)
        if self.value_mix is not None:
            v = self.value_mix(v)
        o = self.attend(q, k, v)
        if angles is not None:  # undo the rotation the values carried, at the query's position
            o = rotate_tail(o, angles[0], -angles[1])
        grouped = o.transpose(1, 2).reshape(batch, seq, self.out_groups.groups, -1)
        return self.out_dropout(self.out(self.out_groups(grouped).flatten(2)))

    def angles(self, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos and sin (seq, rope_dim / 2) of the rotation angles, fp32; None without RoPE."""
        if self.rope is None:
            return None
        cos, sin = self.rope.tables(seq, device, torch.float32)
        half = cos.shape[-1] // 2
        return cos[:, :half], sin[:, :half]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax over the window's keys and the head's sink (dropped after the softmax), times the values."""
        seq = q.shape[-2]
        scores = q @ k.transpose(-1, -2) * self.head_dim ** -0.5  # (batch, heads, seq, seq)
        pos = torch.arange(seq, device=q.device)
        distance = pos[:, None] - pos[None, :]
        scores = scores.masked_fill((distance < 0) | (distance >= self.window), float("-inf"))
        sinks = self.sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.cat([scores, sinks], dim=-1).softmax(dim=-1)[..., :-1]
        probs = F.dropout(probs, self.dropout, self.training)
        return probs @ v

    def extra_repr(self) -> str:
        rope = self.rope.inv_freq.numel() * 2 if self.rope is not None else 0
        return (f"heads={self.heads}, one shared key-value head of {self.head_dim}, rope on the last {rope}, "
                f"window={self.window}, sinks")

    @property
    def output_projection(self) -> nn.Linear:
        return self.out

    def branch_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Weights by role. The shared head is key and value alike; it is given as "v" (the rows a value embedding
        adds to, the matrix DeepNet scales as a value)."""
        return [("q", self.q_down.weight), ("q", self.q_up.weight), ("v", self.kv.weight),
                ("out", self.out_groups.weight), ("out", self.out.weight)]
