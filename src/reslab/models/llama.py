"""The Llama family as small models use it (MiniMind, Llama 2/3, Qwen3): RMSNorm, RoPE, grouped-query attention,
SwiGLU FFN, pre-norm, optional tied embeddings and optional per-head QK RMSNorm (Qwen3).

Touvron et al. 2023 (arXiv 2302.13971); Qwen3 technical report (arXiv 2505.09388) for QK-norm. With
`moe_experts > 0` every FFN is MiniMind's mixture of experts (`reslab.nn.moe`): a softmax router, top-k with the
chosen probabilities renormalised, `moe_shared` always-on experts, and the Switch load-balancing loss
`E sum_i f_i P_i` per sequence as MiniMind computes it (`seq_aux`), weighted by `moe_aux_weight` (Fedus et al.
2021, arXiv 2101.03961).
"""

import torch
import torch.nn as nn

from reslab.contracts import ModelOutput
from reslab.models.base import LanguageModel
from reslab.models.configs import LlamaConfig
from reslab.nn import CausalSelfAttention, SwiGLU
from reslab.nn.moe import MoEFeedForward, TopKRouter, collect_moe


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
        stream = self.stream.enter(self.drop(self.tok_emb(idx)), idx)
        for block in self.blocks:
            stream = block(stream)
        logits = self.head(self.norm(self.stream.reduce(stream)))
        return ModelOutput(logits, *collect_moe(self)) if self.config.moe_experts else ModelOutput(logits)
