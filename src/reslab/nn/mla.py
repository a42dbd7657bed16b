"""Multi-head latent attention (MLA): DeepSeek-AI 2024, DeepSeek-V2 (arXiv 2405.04434), section 2.1; as used by
DeepSeek-V3 (arXiv 2412.19437), with an RMSNorm on each compressed latent.

    queries:  c_q = RMSNorm(x W_dq)          (q_lora_rank; or q = x W_q without the bottleneck)
              [q_nope, q_rope] = c_q W_uq     per head: qk_nope_head_dim + qk_rope_head_dim
    keys and values share one latent:
              [c_kv, k_rope] = x W_dkv        (kv_lora_rank + qk_rope_head_dim)
              [k_nope, v] = RMSNorm(c_kv) W_ukv   per head: qk_nope_head_dim + v_head_dim
    decoupled RoPE: q_rope (per head) and k_rope (one, shared by all heads) are rotated; k = [k_nope, k_rope]
    attention: softmax(q k^T / sqrt(qk_nope_head_dim + qk_rope_head_dim)) v, causal; out = concat_heads W_o

Only the latent c_kv and k_rope would need caching at inference (the point of MLA); training computes the full
keys and values. Weight layouts follow HF's `DeepseekV3Attention` (per-head [k_nope | v] rows in `kv_up`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from reslab.nn.attention import causal_attention
from reslab.nn.norms import RMSNorm
from reslab.nn.rope import RotaryEmbedding


class MultiHeadLatentAttention(nn.Module):
    is_attention = True  # reslab.contracts.Attention (heads, head_dim, kv_heads); ValueMixing too (`value_mix`)
    takes_kv_inputs = True  # forward(x, key_input=, value_input=): keys and values from their own streams (MUDD)

    def __init__(self, width: int, heads: int, q_lora_rank: int | None, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, rope_theta: float = 10000.0, rope_interleave: bool = True,
                 dropout: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.heads = self.kv_heads = heads  # every head has its own keys and values (after the up-projection)
        self.nope, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.kv_rank = kv_lora_rank
        self.qk_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank:
            self.q_down = nn.Linear(width, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank, eps=norm_eps)
            self.q_up = nn.Linear(q_lora_rank, heads * self.qk_dim, bias=False)
        else:
            self.q = nn.Linear(width, heads * self.qk_dim, bias=False)
        self.kv_down = nn.Linear(width, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank, eps=norm_eps)
        self.kv_up = nn.Linear(kv_lora_rank, heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.out = nn.Linear(heads * v_head_dim, width, bias=False)
        self.rope = RotaryEmbedding(qk_rope_head_dim, rope_theta, rope_interleave) if qk_rope_head_dim else None
        self.dropout = dropout
        self.out_dropout = nn.Dropout(dropout)
        # values (batch, heads, seq, v_head_dim) -> values: set by a scheme that mixes values across layers
        self.value_mix: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def head_dim(self) -> float:
        """For FLOPs: scores cost qk_dim and the value sum v_dim per head; 12 H head_dim T counts their mean."""
        return (self.qk_dim + self.v_dim) / 2

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_up(self.q_norm(self.q_down(x))) if hasattr(self, "q_up") else self.q(x)
        return q.view(*x.shape[:2], self.heads, self.qk_dim).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k_nope, k_rope, v) of `x`: per head (batch, heads, seq, dim), k_rope shared (batch, 1, seq, dim)."""
        batch, seq, _ = x.shape
        latent, k_rope = self.kv_down(x).split([self.kv_rank, self.rope_dim], dim=-1)
        kv = self.kv_up(self.kv_norm(latent)).view(batch, seq, self.heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        return k_nope, k_rope.view(batch, 1, seq, self.rope_dim), v

    def forward(self, x: torch.Tensor, key_input: torch.Tensor | None = None,
                value_input: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of `x` over itself; with `key_input` or `value_input` (same shape as `x`), the keys (their
        latent and k_rope) or the values (their latent) come from that stream instead (MUDDFormer's separate Q, K,
        V inputs; each stream then has its own latent, which costs one more kv_down and kv_up). None: from `x`."""
        batch, seq, _ = x.shape
        q_nope, q_rope = self.queries(x).split([self.nope, self.rope_dim], dim=-1)
        if key_input is None and value_input is None:
            k_nope, k_rope, v = self.keys_values(x)
        else:
            k_nope, k_rope, _ = self.keys_values(x if key_input is None else key_input)
            v = self.keys_values(x if value_input is None else value_input)[2]
        if self.rope is not None:
            q_rope, k_rope = self.rope(q_rope), self.rope(k_rope)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(batch, self.heads, seq, self.rope_dim)], dim=-1)
        if self.value_mix is not None:
            v = self.value_mix(v)
        y = causal_attention(q, k, v, self.dropout if self.training else 0.0, scale=self.qk_dim ** -0.5)
        return self.out_dropout(self.out(y.transpose(1, 2).reshape(batch, seq, self.heads * self.v_dim)))

    @property
    def output_projection(self) -> nn.Linear:
        return self.out

    def branch_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Weights by role. The latent rows of `kv_down` feed keys and values alike ("kv"); `kv_up` interleaves
        k_nope and v rows per head, so it is given per head (row-slice views, which init in place)."""
        queries = [("q", self.q_down.weight), ("q", self.q_up.weight)] if hasattr(self, "q_up") else [
            ("q", self.q.weight)]
        latent, k_rope = self.kv_down.weight.split([self.kv_rank, self.rope_dim], dim=0)
        per_head = self.kv_up.weight.split(self.nope + self.v_dim, dim=0)
        keys = [("k", w[:self.nope]) for w in per_head] + ([("k", k_rope)] if self.rope_dim else [])
        values = [("v", w[self.nope:]) for w in per_head]
        return queries + [("kv", latent)] + keys + values + [("out", self.out.weight)]
