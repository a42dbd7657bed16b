"""Llama (`llama`), Mistral without a sliding window (`mistral`) and Qwen3 (`qwen3`, with QK-norm) as reslab's
`llama`: RMSNorm, bias-free grouped-query attention with plain RoPE, a SwiGLU FFN, pre-norm."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reslab.interop.base import HFAdapter, Refusal, Weight, refuse, weight


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
    weight("ffn.gate_up.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", sizes=lambda c: [c.hidden] * 2),
    weight("ffn.down.weight", "mlp.down_proj.weight"),
)
QK_NORM = (weight("attn.q_norm.weight", "self_attn.q_norm.weight"),
           weight("attn.k_norm.weight", "self_attn.k_norm.weight"))


class Llama(HFAdapter):
    reslab_model = "llama"
    hf_types = ("llama", "mistral", "qwen3")
    hf_prefix = "model."
    hf_layer = "layers.{i}."
    ignored_suffixes = ("rotary_emb.inv_freq",)  # old Llama checkpoints store RoPE's buffer; reslab recomputes it
    refused = (
        Refusal("hidden_act", "silu", "reslab's SwiGLU uses silu"),
        Refusal("attention_bias", False, "reslab's llama has no biases in its linears"),
        Refusal("mlp_bias", False, "reslab's llama has no biases in its linears"),
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
            "qk_norm": cfg.model_type == "qwen3",
            "tie_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
            "norm_eps": float(cfg.rms_norm_eps),
            "init_std": float(getattr(cfg, "initializer_range", 0.02)),
            "dropout": 0.0,
            "residual": "pre",
        }

    def hf_config(self, c: Any, transformers: Any) -> Any:
        """LlamaConfig, or Qwen3Config for a model with QK-norm."""
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
        return LLAMA_BLOCK + (QK_NORM if config.qk_norm else ())


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
