"""The Llama family as small models use it (MiniMind, Llama 2/3, Qwen3): RMSNorm, RoPE, grouped-query attention,
SwiGLU FFN, pre-norm, optional tied embeddings and optional per-head QK RMSNorm (Qwen3).

Touvron et al. 2023 (arXiv 2302.13971); Qwen3 technical report (arXiv 2505.09388) for QK-norm. With
`moe_experts > 0` every FFN is MiniMind's mixture of experts (`reslab.nn.moe`): a softmax router, top-k with the
chosen probabilities renormalised, `moe_shared` always-on experts, and the Switch load-balancing loss
`E sum_i f_i P_i` per sequence as MiniMind computes it (`seq_aux`), weighted by `moe_aux_weight` (Fedus et al.
2021, arXiv 2101.03961).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from reslab.checks import NON_NEGATIVE, OnlyWith, Range
from reslab.contracts import ModelOutput
from reslab.errors import ReslabError, check_positive
from reslab.models.base import LanguageModel, TransformerConfig
from reslab.nn import CausalSelfAttention, SwiGLU
from reslab.nn.moe import MoEFeedForward, TopKRouter, collect_moe


@dataclass
class LlamaConfig(TransformerConfig):
    width: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int | None = None  # None: width // heads
    ffn_hidden: int | None = None  # None: 8/3 * width rounded up to a multiple of 64 (MiniMind, Llama)
    rope_theta: float = 10000.0
    qk_norm: bool = False
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    residual: str = "pre"
    moe_experts: int = 0  # 0: a dense SwiGLU FFN; otherwise routed experts of ffn_hidden each
    moe_top_k: int = 2
    moe_shared: int = 0  # always-on shared experts
    moe_aux_weight: float = 0.01  # weight of the load-balancing loss (MiniMind's aux_loss_alpha)
    moe_norm_top_k: bool = True  # renormalise the chosen probabilities to sum 1 (MiniMind, Mixtral)

    RANGES: ClassVar[dict[str, Range]] = {"moe_aux_weight": NON_NEGATIVE}
    ONLY_WITH: ClassVar[dict[str, OnlyWith]] = {name: OnlyWith("moe_experts") for name in
                                                ("moe_top_k", "moe_shared", "moe_aux_weight", "moe_norm_top_k")}

    def validate(self) -> None:
        super().validate()
        check_positive(kv_heads=self.kv_heads, head_dim=self.head_dim, ffn_hidden=self.ffn_hidden,
                       rope_theta=self.rope_theta, moe_top_k=self.moe_top_k)
        if self.moe_experts < 0 or self.moe_shared < 0:
            raise ReslabError("moe_experts and moe_shared must be >= 0")
        if self.moe_experts and self.moe_top_k > self.moe_experts:
            raise ReslabError(f"moe_top_k {self.moe_top_k} exceeds the {self.moe_experts} experts; "
                              "choose moe_top_k <= moe_experts")
        if self.heads % self.kv_heads:
            choices = ", ".join(str(d) for d in range(1, self.heads + 1) if self.heads % d == 0)
            raise ReslabError(f"heads {self.heads} is not divisible by kv_heads {self.kv_heads}; "
                              f"choose kv_heads among {choices}")
        if (self.head_dim or self.width // self.heads) % 2:
            raise ReslabError(f"RoPE needs an even head dimension, got {self.head_dim or self.width // self.heads}; "
                              "change width, heads or head_dim")

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 64 * ((8 * self.width // 3 + 63) // 64)


class Llama(LanguageModel):
    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        if config.moe_experts:
            self.aux_loss_weights = {"moe_balance": config.moe_aux_weight}
        self.build_rmsnorm_stack(lambda layer: (CausalSelfAttention(
            config.width, config.heads, config.kv_heads, config.head_dim, bias=False, dropout=config.dropout,
            rope_theta=config.rope_theta, qk_norm=config.qk_norm, norm_eps=config.norm_eps,
        ), self.feed_forward()))
        self.init_weights(scaled_residual_init=False)

    def feed_forward(self) -> nn.Module:
        c = self.config
        if not c.moe_experts:
            return SwiGLU(c.width, c.hidden, dropout=c.dropout)
        router = TopKRouter(c.width, c.moe_experts, c.moe_top_k, scoring="softmax", normalize=c.moe_norm_top_k)
        return MoEFeedForward(c.width, c.hidden, c.moe_experts, c.moe_top_k, c.moe_shared, router, per_sequence=True,
                              dropout=c.dropout)  # per sequence: MiniMind's default (seq_aux)

    def forward(self, idx: torch.Tensor) -> ModelOutput:
        stream = self.stream.widen(self.drop(self.tok_emb(idx)))
        for block in self.blocks:
            stream = block(stream)
        logits = self.head(self.norm(self.stream.reduce(stream)))
        return ModelOutput(logits, *collect_moe(self)) if self.config.moe_experts else ModelOutput(logits)
