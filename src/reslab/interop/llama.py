"""Llama (`llama`), Mistral without a sliding window (`mistral`) and Qwen3 (`qwen3`, with QK-norm) as reslab's
`llama`: RMSNorm, bias-free grouped-query attention with plain RoPE, a SwiGLU FFN, pre-norm. Their mixtures of
experts, Mixtral (`mixtral`) and Qwen3-MoE (`qwen3_moe`, every layer sparse), are `llama --moe-experts N`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from reslab.interop.base import HFAdapter, Refusal, Weight, refuse, weight
from reslab.interop.experts import stack_experts


def _qkv_rows(c: Any) -> list[int]:
    """Rows of q, k and v in reslab's fused `qkv`."""
    head_dim = c.head_dim or c.width // c.heads
    return [c.heads * head_dim, c.kv_heads * head_dim, c.kv_heads * head_dim]


LLAMA_BLOCK = (
    weight("attn_residual.norm.weight", "input_layernorm.weight"),
    weight("attn.qkv.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
           sizes=_qkv_rows),
    weight("attn.out.weight", "self_attn.o_proj.weight"),
    weight("ffn_residual.norm.weight", "post_attention_layernorm.weight"),
)
DENSE_FFN = (
    weight("ffn.gate_up.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", sizes=lambda c: [c.hidden] * 2),
    weight("ffn.down.weight", "mlp.down_proj.weight"),
)
MOE_FFN = (
    weight("ffn.router.gate.weight", "mlp.gate.weight"),
    weight("ffn.experts.gate_up", "mlp.experts.gate_up_proj"),
    weight("ffn.experts.down", "mlp.experts.down_proj"),
)
QK_NORM = (weight("attn.q_norm.weight", "self_attn.q_norm.weight"),
           weight("attn.k_norm.weight", "self_attn.k_norm.weight"))


class Llama(HFAdapter):
    reslab_model = "llama"
    hf_types = ("llama", "mistral", "qwen3", "mixtral", "qwen3_moe")
    hf_prefix = "model."
    hf_layer = "layers.{i}."
    ignored_suffixes = ("rotary_emb.inv_freq",)  # old Llama checkpoints store RoPE's buffer; reslab recomputes it
    refused = (
        Refusal("hidden_act", "silu", "reslab's SwiGLU uses silu"),
        Refusal("attention_bias", False, "reslab's llama has no biases in its linears"),
        Refusal("mlp_bias", False, "reslab's llama has no biases in its linears"),
        Refusal("decoder_sparse_step", 1, "reslab's llama MoE makes every layer sparse"),
        Refusal("router_jitter_noise", 0.0, "reslab's router adds no noise"),
    )

    def overrides(self, cfg: Any) -> dict[str, Any]:
        context = cfg.max_position_embeddings
        _check_full_attention(cfg, context)
        heads = cfg.num_attention_heads
        return {
            "vocab_size": cfg.vocab_size,
            "context": context,
            "width": cfg.hidden_size,
            "layers": cfg.num_hidden_layers,
            "heads": heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            "ffn_hidden": cfg.intermediate_size,
            "rope_theta": _rope_theta(cfg),
            "qk_norm": cfg.model_type in ("qwen3", "qwen3_moe"),
            "tie_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
            "norm_eps": float(cfg.rms_norm_eps),
            "init_std": float(getattr(cfg, "initializer_range", 0.02)),
            "dropout": 0.0,
            "residual": "pre",
            **_moe_overrides(cfg),
        }

    def hf_config(self, c: Any, transformers: Any) -> Any:
        """LlamaConfig, or Qwen3Config for a model with QK-norm; MixtralConfig or Qwen3MoeConfig with experts."""
        if c.moe_experts:
            return _moe_hf_config(c, transformers)
        config_class = transformers.Qwen3Config if c.qk_norm else transformers.LlamaConfig
        return config_class(
            vocab_size=c.vocab_size, max_position_embeddings=c.context, hidden_size=c.width,
            num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.kv_heads,
            head_dim=c.head_dim or c.width // c.heads, intermediate_size=c.hidden, hidden_act="silu",
            rms_norm_eps=c.norm_eps, initializer_range=c.init_std, attention_dropout=c.dropout,
            tie_word_embeddings=c.tie_embeddings, bos_token_id=None, eos_token_id=None,
            rope_theta=c.rope_theta,  # transformers 5 moves it into rope_parameters itself
        )

    def outer_weights(self, config: Any) -> tuple[Weight, ...]:
        return (weight("tok_emb.weight", "embed_tokens.weight"), weight("norm.weight", "norm.weight"))

    def block_weights(self, config: Any) -> tuple[Weight, ...]:
        return LLAMA_BLOCK + (MOE_FFN if config.moe_experts else DENSE_FFN) + (QK_NORM if config.qk_norm else ())

    def module_layout(self, tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        return stack_experts(tensors)  # MoE files hold one tensor per expert, HF's modules stacks


def _moe_overrides(cfg: Any) -> dict[str, Any]:
    """The MoE fields of Mixtral and Qwen3-MoE (every layer sparse, softmax router, no shared expert)."""
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0
    if not experts or cfg.model_type not in ("mixtral", "qwen3_moe"):
        return {}
    if getattr(cfg, "mlp_only_layers", None):
        raise refuse(f"{cfg.model_type} mlp_only_layers={cfg.mlp_only_layers} is not supported",
                     "reslab's llama MoE makes every layer sparse")
    hidden = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    return {"moe_experts": experts, "moe_top_k": cfg.num_experts_per_tok, "moe_shared": 0, "ffn_hidden": hidden,
            "moe_aux_weight": float(cfg.router_aux_loss_coef),
            "moe_norm_top_k": bool(getattr(cfg, "norm_topk_prob", True))}


def _moe_hf_config(c: Any, transformers: Any) -> Any:
    """MixtralConfig (renormalised top-k, no QK-norm) or Qwen3MoeConfig (QK-norm); no shared experts either way."""
    if c.moe_shared or not (c.qk_norm or c.moe_norm_top_k):
        raise refuse(f"llama with moe_shared={c.moe_shared}, moe_norm_top_k={c.moe_norm_top_k}, qk_norm={c.qk_norm} "
                     "has no Hugging Face equivalent", "use no shared expert, and QK-norm or a normalised top-k")
    shape = dict(vocab_size=c.vocab_size, max_position_embeddings=c.context, hidden_size=c.width,
                 num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.kv_heads,
                 head_dim=c.head_dim or c.width // c.heads, hidden_act="silu", rms_norm_eps=c.norm_eps,
                 initializer_range=c.init_std, attention_dropout=c.dropout, tie_word_embeddings=c.tie_embeddings,
                 bos_token_id=None, eos_token_id=None, rope_theta=c.rope_theta, num_experts_per_tok=c.moe_top_k,
                 router_aux_loss_coef=c.moe_aux_weight)
    if c.qk_norm:
        return transformers.Qwen3MoeConfig(**shape, num_experts=c.moe_experts, moe_intermediate_size=c.hidden,
                                           intermediate_size=c.hidden, norm_topk_prob=c.moe_norm_top_k)
    return transformers.MixtralConfig(**shape, num_local_experts=c.moe_experts, intermediate_size=c.hidden)


def _rope_theta(cfg: Any) -> float:
    """RoPE's base, from `rope_parameters` (transformers 5) or `rope_theta` / `rope_scaling` (transformers 4).

    Only plain RoPE is accepted: scaled variants (linear, dynamic, yarn, llama3, ...) change the angles, which
    reslab's RotaryEmbedding does not do.
    """
    settings: dict[str, Any] = {}
    for name in ("rope_scaling", "rope_parameters"):  # in transformers 5 both name the same dict
        value = getattr(cfg, name, None)
        if isinstance(value, Mapping):
            settings.update(value)
    kind = settings.get("rope_type", settings.get("type", "default"))
    if kind != "default":
        raise refuse(f"{cfg.model_type} RoPE scaling {kind!r} is not supported",
                     "reslab implements plain RoPE only; use a checkpoint with rope_type 'default'")
    partial = settings.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise refuse(f"{cfg.model_type} partial_rotary_factor={partial} is not supported",
                     "reslab rotates every channel of each head")
    return float(settings.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _check_full_attention(cfg: Any, context: int) -> None:
    """Refuse local (sliding-window) attention unless the window covers the whole context, where it is a no-op."""
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        other = sorted({kind for kind in layer_types if kind != "full_attention"})
        if other:
            raise refuse(f"{cfg.model_type} layer type {other[0]!r} is not supported",
                         "reslab implements full causal attention only (turn off use_sliding_window)")
        return
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) and window is not None and window < context:
        raise refuse(f"{cfg.model_type} sliding_window={window} is shorter than the context {context}",
                     "reslab implements full causal attention only; use a checkpoint with sliding_window null")
