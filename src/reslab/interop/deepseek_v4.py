"""DeepSeek-V4 (`deepseek_v4`, HF's `DeepseekV4ForCausalLM`, transformers 5.25) as reslab's `deepseek-v4`, with its
mHC as reslab's `mhc-v4` scheme: the sites hold `attn_hc` / `ffn_hc` (fn, base, scale) beside the pre-norms, the
stream adapter holds `hc_head`.

Refused, one line each naming the field: compressed attention layers (`layer_types` other than
sliding_attention), a main RoPE other than plain (YaRN), hash layers that are not the first ones, and mHC or norm
epsilons other than reslab's (1e-6). HF's V4 attention has one shared key-value head whatever
`num_key_value_heads` says, builds one shared expert of moe_intermediate_size whatever `n_shared_experts` says, and
always normalises the chosen gates (`norm_topk_prob` is not read): none of these fields changes the function.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from reslab.interop.base import HFAdapter, Refusal, Weight, refuse, weight
from reslab.interop.experts import stack_experts
from reslab.residual.mhc_v4 import HC_EPS, RMS_EPS

SITE = ("fn", "base", "scale")


def _site(ours: str, theirs: str, norm: str) -> tuple[Weight, ...]:
    return (weight(f"{ours}.norm.weight", f"{norm}.weight"),
            *(weight(f"{ours}.{name}", f"{theirs}.{name}") for name in SITE))


BLOCK = (
    *_site("attn_residual", "attn_hc", "input_layernorm"),
    *_site("ffn_residual", "ffn_hc", "post_attention_layernorm"),
    weight("attn.q_down.weight", "self_attn.q_a_proj.weight"),
    weight("attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    weight("attn.q_up.weight", "self_attn.q_b_proj.weight"),
    weight("attn.kv.weight", "self_attn.kv_proj.weight"),
    weight("attn.kv_norm.weight", "self_attn.kv_norm.weight"),
    weight("attn.out_groups.weight", "self_attn.o_a_proj.weight"),
    weight("attn.out.weight", "self_attn.o_b_proj.weight"),
    weight("attn.sinks", "self_attn.sinks"),
    weight("ffn.router.gate.weight", "mlp.gate.weight"),
    weight("ffn.experts.gate_up", "mlp.experts.gate_up_proj"),
    weight("ffn.experts.down", "mlp.experts.down_proj"),
    weight("ffn.shared.gate_up.weight", "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight",
           sizes=lambda c: [c.moe_hidden] * 2),
    weight("ffn.shared.down.weight", "mlp.shared_experts.down_proj.weight"),
)
# DeepSeek's own tensor names (its checkpoints, and the files transformers 5.25 writes for V4, which `save_pretrained`
# converts back to them) -> the names of transformers' modules: the renamings of transformers' conversion_mapping.py
# ("deepseek_v4"), in order; names already in the modules' layout pass unchanged
FILE_NAMES = tuple((re.compile(pattern), replacement) for pattern, replacement in (
    (r"(^|\.)embed\.weight$", r"\1embed_tokens.weight"),
    (r"^head\.weight$", "lm_head.weight"),
    (r"(^|\.)hc_head_(fn|base|scale)$", r"\1hc_head.hc_\2"),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.attn_sink$", ".sinks"),
    (r"\.self_attn\.norm\.", ".self_attn.kv_norm."),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.wq_b\.", ".q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
))
HASH = (weight("ffn.router.tid2eid", "mlp.gate.tid2eid"),)
TOP_K = (weight("ffn.router.bias", "mlp.gate.e_score_correction_bias"),)


class DeepSeekV4(HFAdapter):
    reslab_model = "deepseek-v4"
    hf_types = ("deepseek_v4",)
    hf_prefix = "model."
    hf_layer = "layers.{i}."
    residual = "mhc-v4"
    refused = (
        Refusal("hidden_act", "silu", "reslab's experts use silu"),
        Refusal("attention_bias", False, "reslab's V4 attention has no biases"),
        Refusal("mlp_bias", False, "reslab's experts have no biases"),
        Refusal("hc_eps", HC_EPS, f"reslab's mhc-v4 uses hc_eps={HC_EPS}; set it"),
        Refusal("rms_norm_eps", RMS_EPS, f"reslab's mhc-v4 normalises its streams with eps {RMS_EPS}; set it"),
    )

    def overrides(self, cfg: Any) -> dict[str, Any]:
        return {
            "vocab_size": cfg.vocab_size, "context": cfg.max_position_embeddings, "width": cfg.hidden_size,
            "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads, "head_dim": cfg.head_dim,
            "q_lora_rank": cfg.q_lora_rank, "rope_dim": int(cfg.qk_rope_head_dim), "rope_theta": _main_rope(cfg),
            "out_groups": cfg.o_groups, "out_rank": cfg.o_lora_rank, "window": cfg.sliding_window,
            "moe_experts": cfg.n_routed_experts, "moe_top_k": cfg.num_experts_per_tok,
            "moe_hidden": cfg.moe_intermediate_size, "hash_layers": _hash_layers(cfg),
            "router_scoring": cfg.scoring_func, "routed_scale": float(cfg.routed_scaling_factor),
            "swiglu_limit": float(cfg.swiglu_limit), "tie_embeddings": bool(cfg.tie_word_embeddings),
            "norm_eps": float(cfg.rms_norm_eps), "init_std": float(cfg.initializer_range), "dropout": 0.0,
            "residual": "mhc-v4",
            "residual_options": {"mhc_v4_streams": cfg.hc_mult, "mhc_v4_sinkhorn_iters": cfg.hc_sinkhorn_iters},
        }

    def hf_config(self, c: Any, transformers: Any) -> Any:
        if not c.rope_dim:
            raise refuse("deepseek-v4 with rope_dim=0 has no Hugging Face equivalent (DeepseekV4Attention always "
                         "rotates a slice of each head)", "set rope_dim to an even number >= 2")
        options = c.residual_options
        return transformers.DeepseekV4Config(
            vocab_size=c.vocab_size, max_position_embeddings=c.context, hidden_size=c.width,
            num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=1, head_dim=c.head_dim,
            q_lora_rank=c.q_lora_rank, partial_rotary_factor=c.rope_dim / c.head_dim, rope_theta=c.rope_theta,
            o_groups=c.out_groups, o_lora_rank=c.out_rank, sliding_window=c.window,
            layer_types=["sliding_attention"] * c.layers,
            mlp_layer_types=["hash_moe"] * c.hash_layers + ["moe"] * (c.layers - c.hash_layers),
            n_routed_experts=c.moe_experts, num_experts_per_tok=c.moe_top_k, n_shared_experts=1,
            moe_intermediate_size=c.moe_hidden, scoring_func=c.router_scoring, norm_topk_prob=True,
            routed_scaling_factor=c.routed_scale, swiglu_limit=c.swiglu_limit,
            hc_mult=options.get("mhc_v4_streams", 4), hc_sinkhorn_iters=options.get("mhc_v4_sinkhorn_iters", 20),
            hc_eps=HC_EPS, rms_norm_eps=c.norm_eps, initializer_range=c.init_std, hidden_act="silu",
            attention_dropout=c.dropout, tie_word_embeddings=c.tie_embeddings, bos_token_id=None, eos_token_id=None,
        )

    def module_layout(self, tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """DeepSeek's file names renamed to the modules' (`FILE_NAMES`), then the per-expert w1/w3/w2 stacked."""
        return stack_experts({_module_name(key): tensor for key, tensor in tensors.items()})

    def outer_weights(self, config: Any) -> tuple[Weight, ...]:
        return (weight("tok_emb.weight", "embed_tokens.weight"), weight("norm.weight", "norm.weight"),
                *(weight(f"stream.hc_{name}", f"hc_head.hc_{name}") for name in SITE))

    def block_weights(self, config: Any) -> tuple[Weight, ...]:
        return self.layer_weights(config, config.layers - 1)

    def layer_weights(self, config: Any, layer: int) -> tuple[Weight, ...]:
        return BLOCK + (HASH if layer < config.hash_layers else TOP_K)


def _module_name(key: str) -> str:
    for pattern, replacement in FILE_NAMES:
        key = pattern.sub(replacement, key)
    return key


def _main_rope(cfg: Any) -> float:
    """The base of the sliding layers' RoPE (`rope_parameters["main"]`); refused if it is scaled."""
    main = (getattr(cfg, "rope_parameters", None) or {}).get("main") or {}
    kind = main.get("rope_type", "default")
    if kind != "default":
        raise refuse(f"deepseek_v4 rope_parameters['main'] has rope_type={kind!r}", "reslab rotates by plain RoPE "
                     "on the sliding-window layers; set rope_type='default'")
    return float(main.get("rope_theta", cfg.rope_theta))


def _hash_layers(cfg: Any) -> int:
    """How many leading layers route by hash; refused for compressed attention or hash layers after top-k ones."""
    compressed = sorted({kind for kind in cfg.layer_types if kind != "sliding_attention"})
    if compressed:
        raise refuse(f"deepseek_v4 layer_types has {compressed[0]!r} (compressed attention), which reslab does not "
                     "build", "set every entry of layer_types to 'sliding_attention'")
    kinds = list(cfg.mlp_layer_types)
    count = kinds.count("hash_moe")
    if kinds[:count] != ["hash_moe"] * count:
        raise refuse(f"deepseek_v4 mlp_layer_types {kinds} puts a hash_moe layer after a moe layer",
                     "reslab routes by hash in the first layers only; list the hash_moe layers first")
    return count
