"""DeepSeek-V4 at lab size, as transformers 5.25 builds it (`models/deepseek_v4`) for its sliding-window layers:
DeepSeek-V4's mHC residual (`mhc-v4`, 4 streams, the HyperHead collapse before the final norm) by default, any
reslab scheme with `--residual`; shared-KV multi-query attention with partial interleaved RoPE, the inverse
rotation of the output, per-head sinks, a sliding window and a grouped low-rank output projection
(`reslab.nn.shared_kv`); a mixture of experts in every block, sqrt-softplus scores, a shared expert, the SwiGLU
clamp, the first `hash_layers` routed by a hash of the token id and the rest top-k with auxiliary-loss-free
balancing (`reslab.nn.moe`).

Not built: the compressed attention layers (CSA, HCA: `layer_types` other than sliding_attention), the
multi-token-prediction layers (which transformers does not build either) and YaRN scaling of the main RoPE; the
Hugging Face adapter (`reslab.interop.deepseek_v4`) refuses each in one line naming its field.

DeepSeek-AI 2026, DeepSeek-V4; mHC: arXiv 2512.24880.
"""

import torch

from reslab.contracts import ModelOutput
from reslab.models.base import LanguageModel
from reslab.models.configs import DeepSeekV4Config
from reslab.nn.moe import HashRouter, MoEFeedForward, TopKRouter, bind_tokens, collect_moe
from reslab.nn.shared_kv import SharedKVAttention


class DeepSeekV4(LanguageModel):
    config_class = DeepSeekV4Config

    def __init__(self, config: DeepSeekV4Config):
        super().__init__()
        self.config = config
        self.aux_loss_weights = {"moe_balance": config.moe_aux_weight}
        self.build_rmsnorm_stack(lambda layer: (self.attention(), self.feed_forward(layer)))
        self.init_weights(scaled_residual_init=False)

    def attention(self) -> SharedKVAttention:
        c = self.config
        return SharedKVAttention(c.width, c.heads, c.head_dim, c.q_lora_rank, c.rope_dim, c.rope_theta,
                                 c.out_groups, c.out_rank, c.window, c.dropout, c.norm_eps)

    def feed_forward(self, layer: int) -> MoEFeedForward:
        c = self.config
        if layer < c.hash_layers:
            router = HashRouter(c.width, c.moe_experts, c.moe_top_k, c.vocab_size, c.router_scoring,
                                scale=c.routed_scale)
        else:
            router = TopKRouter(c.width, c.moe_experts, c.moe_top_k, c.router_scoring, scale=c.routed_scale,
                                balance_bias=True)
        return MoEFeedForward(c.width, c.moe_hidden, c.moe_experts, c.moe_top_k, 1, router, per_sequence=True,
                              balance_rate=c.balance_rate, dropout=c.dropout, limit=c.swiglu_limit)

    def forward(self, idx: torch.Tensor) -> ModelOutput:
        self.check_length(idx.shape[1])
        bind_tokens(self, idx)
        stream = self.stream.enter(self.drop(self.tok_emb(idx)), idx)
        for block in self.blocks:
            stream = block(stream)
        logits = self.head(self.norm(self.stream.reduce(stream)))
        return ModelOutput(logits, *collect_moe(self))


