"""DeepSeek-V3 (`deepseek_v3`, HF's `DeepseekV3ForCausalLM`) as reslab's `deepseek`: multi-head latent attention
with plain (default) RoPE, interleaved or not, the first `first_k_dense_replace` blocks dense, the rest DeepSeekMoE
with sigmoid routing, group-limited top-k and the balance bias (`e_score_correction_bias`).

HF's layouts are reslab's (stacked experts, per-head [k_nope | v] rows in `kv_b_proj`), so the tables only rename;
what differs per block is dense or MoE, hence `layer_weights`. Multi-token-prediction layers are not computed by
HF's forward and are not part of the weights it builds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from reslab.interop.base import HFAdapter, Refusal, Weight, refuse, weight
from reslab.interop.experts import stack_experts
from reslab.interop.llama import _rope_theta

ATTENTION = (
    weight("attn_residual.norm.weight", "input_layernorm.weight"),
    weight("attn.kv_down.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    weight("attn.kv_norm.weight", "self_attn.kv_a_layernorm.weight"),
    weight("attn.kv_up.weight", "self_attn.kv_b_proj.weight"),
    weight("attn.out.weight", "self_attn.o_proj.weight"),
    weight("ffn_residual.norm.weight", "post_attention_layernorm.weight"),
)
QUERY = (weight("attn.q.weight", "self_attn.q_proj.weight"),)
LOW_RANK_QUERY = (
    weight("attn.q_down.weight", "self_attn.q_a_proj.weight"),
    weight("attn.q_norm.weight", "self_attn.q_a_layernorm.weight"),
    weight("attn.q_up.weight", "self_attn.q_b_proj.weight"),
)
DENSE = (
    weight("ffn.gate_up.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", sizes=lambda c: [c.ffn_hidden] * 2),
    weight("ffn.down.weight", "mlp.down_proj.weight"),
)
MOE = (
    weight("ffn.router.gate.weight", "mlp.gate.weight"),
    weight("ffn.router.bias", "mlp.gate.e_score_correction_bias"),
    weight("ffn.experts.gate_up", "mlp.experts.gate_up_proj"),
    weight("ffn.experts.down", "mlp.experts.down_proj"),
    weight("ffn.shared.gate_up.weight", "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight",
           sizes=lambda c: [c.moe_hidden * c.moe_shared] * 2),
    weight("ffn.shared.down.weight", "mlp.shared_experts.down_proj.weight"),
)


class DeepSeekV3(HFAdapter):
    reslab_model = "deepseek"
    hf_types = ("deepseek_v3",)
    hf_prefix = "model."
    hf_layer = "layers.{i}."
    refused = (
        Refusal("hidden_act", "silu", "reslab's SwiGLU uses silu"),
        Refusal("attention_bias", False, "reslab's MLA has no biases in its linears"),
    )

    def overrides(self, cfg: Any) -> dict[str, Any]:
        heads = cfg.num_attention_heads
        if (cfg.num_key_value_heads or heads) != heads:
            raise refuse(f"deepseek_v3 num_key_value_heads={cfg.num_key_value_heads} differs from the {heads} heads",
                         "MLA up-projects keys and values for every head; set num_key_value_heads to heads")
        if not cfg.n_shared_experts:
            raise refuse("deepseek_v3 without shared experts is not supported", "set n_shared_experts >= 1")
        return {
            "vocab_size": cfg.vocab_size, "context": cfg.max_position_embeddings, "width": cfg.hidden_size,
            "layers": cfg.num_hidden_layers, "heads": heads, "q_lora_rank": cfg.q_lora_rank,
            "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
            "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim, "rope_theta": _rope_theta(cfg),
            "rope_interleave": bool(cfg.rope_interleave), "ffn_hidden": cfg.intermediate_size,
            "first_k_dense": cfg.first_k_dense_replace or 0, "moe_experts": cfg.n_routed_experts,
            "moe_top_k": cfg.num_experts_per_tok, "moe_shared": cfg.n_shared_experts,
            "moe_hidden": cfg.moe_intermediate_size, "router_scoring": "sigmoid",
            "norm_top_k": bool(cfg.norm_topk_prob), "routed_scale": float(cfg.routed_scaling_factor),
            "expert_groups": cfg.n_group or 1, "top_groups": cfg.topk_group or 1,
            "tie_embeddings": bool(cfg.tie_word_embeddings), "norm_eps": float(cfg.rms_norm_eps),
            "init_std": float(cfg.initializer_range), "dropout": 0.0, "residual": "pre",
        }

    def hf_config(self, c: Any, transformers: Any) -> Any:
        if c.router_scoring != "sigmoid" or not c.moe_shared:
            raise refuse(f"deepseek with router_scoring={c.router_scoring!r}, moe_shared={c.moe_shared} has no "
                         "Hugging Face DeepseekV3 equivalent", "use sigmoid routing and at least one shared expert")
        return transformers.DeepseekV3Config(
            vocab_size=c.vocab_size, max_position_embeddings=c.context, hidden_size=c.width,
            num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.heads,
            q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
            qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, rope_interleave=c.rope_interleave,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, intermediate_size=c.ffn_hidden,
            first_k_dense_replace=c.first_k_dense, n_routed_experts=c.moe_experts, num_experts_per_tok=c.moe_top_k,
            n_shared_experts=c.moe_shared, moe_intermediate_size=c.moe_hidden, norm_topk_prob=c.norm_top_k,
            routed_scaling_factor=c.routed_scale, n_group=c.expert_groups, topk_group=c.top_groups,
            hidden_act="silu", rms_norm_eps=c.norm_eps, initializer_range=c.init_std, attention_dropout=c.dropout,
            tie_word_embeddings=c.tie_embeddings, bos_token_id=None, eos_token_id=None,
        )

    def module_layout(self, tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        return stack_experts(tensors)  # files hold one tensor per expert, HF's modules stacks

    def outer_weights(self, config: Any) -> tuple[Weight, ...]:
        return (weight("tok_emb.weight", "embed_tokens.weight"), weight("norm.weight", "norm.weight"))

    def block_weights(self, config: Any) -> tuple[Weight, ...]:
        return self.layer_weights(config, config.layers - 1)

    def layer_weights(self, config: Any, layer: int) -> tuple[Weight, ...]:
        query = LOW_RANK_QUERY if config.q_lora_rank else QUERY
        return ATTENTION + query + (DENSE if layer < config.first_k_dense else MOE)
