"""DeepSeek-V3 at lab size: multi-head latent attention, DeepSeekMoE feed-forward layers (shared plus fine-grained
routed experts, sigmoid routing, auxiliary-loss-free balancing), a dense SwiGLU FFN in the first `first_k_dense`
blocks, RMSNorm, pre-norm by default (any reslab residual scheme).

DeepSeek-AI 2024: DeepSeek-V3 technical report (arXiv 2412.19437); MLA from DeepSeek-V2 (arXiv 2405.04434);
DeepSeekMoE (arXiv 2401.06066). Defaults train on 2 CPU cores in minutes; V3 itself is width 7168, 61 layers,
128 heads, q_lora_rank 1536, kv_lora_rank 512, 256 routed experts top-8, 1 shared, first_k_dense 3.
"""

import torch
import torch.nn as nn

from reslab.contracts import ModelOutput
from reslab.models.base import LanguageModel
from reslab.models.configs import DeepSeekConfig
from reslab.nn import SwiGLU
from reslab.nn.mla import MultiHeadLatentAttention
from reslab.nn.moe import MoEFeedForward, TopKRouter, collect_moe


class DeepSeek(LanguageModel):
    config_class = DeepSeekConfig

    def __init__(self, config: DeepSeekConfig):
        super().__init__()
        self.config = config
        self.aux_loss_weights = {"moe_balance": config.moe_aux_weight}
        self.build_rmsnorm_stack(lambda layer: (self.attention(), self.feed_forward(layer)))
        self.init_weights(scaled_residual_init=False)

    def attention(self) -> MultiHeadLatentAttention:
        c = self.config
        return MultiHeadLatentAttention(c.width, c.heads, c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim,
                                        c.qk_rope_head_dim, c.v_head_dim, c.rope_theta, c.rope_interleave,
                                        c.dropout, c.norm_eps)

    def feed_forward(self, layer: int) -> nn.Module:
        c = self.config
        if layer < c.first_k_dense:
            return SwiGLU(c.width, c.ffn_hidden, dropout=c.dropout)
        router = TopKRouter(c.width, c.moe_experts, c.moe_top_k, c.router_scoring, c.norm_top_k, c.routed_scale,
                            c.expert_groups, c.top_groups, balance_bias=True)
        return MoEFeedForward(c.width, c.moe_hidden, c.moe_experts, c.moe_top_k, c.moe_shared, router,
                              per_sequence=True, balance_rate=c.balance_rate, dropout=c.dropout)

    def forward(self, idx: torch.Tensor) -> ModelOutput:
        self.check_length(idx.shape[1])
        stream = self.stream.enter(self.drop(self.tok_emb(idx)), idx)
        for block in self.blocks:
            stream = block(stream)
        logits = self.head(self.norm(self.stream.reduce(stream)))
        return ModelOutput(logits, *collect_moe(self))
