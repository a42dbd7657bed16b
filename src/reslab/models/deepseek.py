"""DeepSeek-V3 at lab size: multi-head latent attention, DeepSeekMoE feed-forward layers (shared plus fine-grained
routed experts, sigmoid routing, auxiliary-loss-free balancing), a dense SwiGLU FFN in the first `first_k_dense`
blocks, RMSNorm, pre-norm by default (any reslab residual scheme).

DeepSeek-AI 2024: DeepSeek-V3 technical report (arXiv 2412.19437); MLA from DeepSeek-V2 (arXiv 2405.04434);
DeepSeekMoE (arXiv 2401.06066). Defaults train on 2 CPU cores in minutes; V3 itself is width 7168, 61 layers,
128 heads, q_lora_rank 1536, kv_lora_rank 512, 256 routed experts top-8, 1 shared, first_k_dense 3.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from reslab.checks import NON_NEGATIVE, POSITIVE, OnlyWith, Range
from reslab.contracts import ModelOutput
from reslab.errors import ReslabError, check_positive, unknown
from reslab.models.base import LanguageModel, TransformerConfig
from reslab.nn import SwiGLU
from reslab.nn.mla import MultiHeadLatentAttention
from reslab.nn.moe import SCORING, MoEFeedForward, TopKRouter, collect_moe


@dataclass
class DeepSeekConfig(TransformerConfig):
    width: int = 128
    layers: int = 4
    heads: int = 4
    q_lora_rank: int | None = 64  # None: queries straight from the stream (DeepSeek-V2-Lite)
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16  # 0: no RoPE at all
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    rope_interleave: bool = True  # DeepSeek's pair layout (2i, 2i+1); False: Llama's half-split
    ffn_hidden: int = 256  # the dense SwiGLU of the first `first_k_dense` blocks
    first_k_dense: int = 1
    moe_experts: int = 8  # routed experts
    moe_top_k: int = 2
    moe_shared: int = 1  # shared experts (always on)
    moe_hidden: int = 64  # hidden size of each expert
    moe_aux_weight: float = 0.0001  # weight of the sequence-wise balance loss (V3's alpha)
    router_scoring: str = "sigmoid"
    norm_top_k: bool = True  # normalise the chosen gates to sum 1
    routed_scale: float = 1.0  # routed scaling factor (2.5 in V3)
    expert_groups: int = 1  # group-limited routing: groups of experts ...
    top_groups: int = 1  # ... of which each token may use this many
    balance_rate: float = 0.001  # the bias update speed gamma of auxiliary-loss-free balancing (0: off)
    tie_embeddings: bool = False
    norm_eps: float = 1e-6

    RANGES: ClassVar[dict[str, Range]] = {"moe_aux_weight": NON_NEGATIVE, "routed_scale": POSITIVE,
                                          "balance_rate": NON_NEGATIVE}
    ONLY_WITH: ClassVar[dict[str, OnlyWith]] = {"ffn_hidden": OnlyWith("first_k_dense"),  # the dense blocks' FFN
                                                "rope_theta": OnlyWith("qk_rope_head_dim"),
                                                "rope_interleave": OnlyWith("qk_rope_head_dim")}

    def validate(self) -> None:
        super().validate()
        check_positive(q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank, v_head_dim=self.v_head_dim,
                       qk_nope_head_dim=self.qk_nope_head_dim, ffn_hidden=self.ffn_hidden, moe_experts=self.moe_experts,
                       moe_top_k=self.moe_top_k, moe_hidden=self.moe_hidden, expert_groups=self.expert_groups,
                       top_groups=self.top_groups)
        if self.router_scoring not in SCORING:
            raise unknown("router scoring", self.router_scoring, SCORING)
        if self.qk_rope_head_dim < 0 or self.qk_rope_head_dim % 2:
            raise ReslabError(f"qk_rope_head_dim must be even and >= 0, got {self.qk_rope_head_dim}")
        if self.first_k_dense < 0 or self.moe_shared < 0:
            raise ReslabError("first_k_dense and moe_shared must be >= 0")
        check_routing(self.moe_experts, self.moe_top_k, self.expert_groups, self.top_groups)


def check_routing(experts: int, top_k: int, groups: int = 1, top_groups: int = 1) -> None:
    """One line for a top-k or grouping that cannot route."""
    if top_k > experts:
        raise ReslabError(f"moe_top_k {top_k} exceeds the {experts} experts; choose moe_top_k <= moe_experts")
    if experts % groups or top_groups > groups:
        raise ReslabError(f"{experts} experts cannot form {groups} equal groups with {top_groups} used; "
                          "choose expert_groups dividing moe_experts and top_groups <= expert_groups")
    if top_k > top_groups * experts // groups:
        raise ReslabError(f"moe_top_k {top_k} exceeds the experts of {top_groups} groups; raise top_groups")


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
        stream = self.stream.widen(self.drop(self.tok_emb(idx)))
        for block in self.blocks:
            stream = block(stream)
        logits = self.head(self.norm(self.stream.reduce(stream)))
        return ModelOutput(logits, *collect_moe(self))
