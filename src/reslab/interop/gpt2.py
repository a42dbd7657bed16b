"""GPT-2 (`gpt2`) as reslab's `gpt`: pre-LN, learned positions, biases, a 4x MLP, attention scaled by 1/sqrt(d)."""

from __future__ import annotations

from typing import Any

from reslab.interop.base import HFAdapter, Refusal, Weight, refuse, weight

# HF activation_function -> reslab's gpt activation ("gelu_new" and "gelu_pytorch_tanh" are both the tanh GELU)
GPT2_ACTIVATIONS = {"gelu_new": "gelu-tanh", "gelu_pytorch_tanh": "gelu-tanh", "gelu": "gelu", "relu": "relu",
                    "relu2": "relu2"}

# (reslab module, HF GPT-2 module, stored transposed by HF's Conv1D?) for the modules of one block; each has a
# weight and a bias.
GPT2_BLOCK_NAMES = (
    ("attn_residual.norm", "ln_1", False),
    ("attn.qkv", "attn.c_attn", True),  # c_attn is already fused q|k|v like `qkv`
    ("attn.out", "attn.c_proj", True),
    ("ffn_residual.norm", "ln_2", False),
    ("ffn.up", "mlp.c_fc", True),
    ("ffn.down", "mlp.c_proj", True),
)


def _with_bias(reslab: str, hf: str, transpose: bool = False) -> tuple[Weight, Weight]:
    """A module's weight and its bias; HF's GPT-2 always has the bias, so a bias-free reslab GPT exports zeros."""
    return (weight(f"{reslab}.weight", f"{hf}.weight", transpose=transpose),
            weight(f"{reslab}.bias", f"{hf}.bias", bias_of=f"{reslab}.weight"))


class GPT2(HFAdapter):
    reslab_model = "gpt"
    hf_types = ("gpt2",)
    hf_prefix = "transformer."
    hf_layer = "h.{i}."
    # the causal mask some HF versions store as a buffer; reslab builds its own
    ignored_suffixes = (".attn.bias", ".attn.masked_bias")
    refused = (
        Refusal("scale_attn_by_inverse_layer_idx", False,
                "reslab scales attention by 1/sqrt(head_dim) only; use a checkpoint trained without it"),
        Refusal("scale_attn_weights", True, "reslab always scales attention by 1/sqrt(head_dim)"),
        Refusal("add_cross_attention", False, "reslab converts decoder-only GPT-2"),
    )

    def overrides(self, cfg: Any) -> dict[str, Any]:
        activation = getattr(cfg, "activation_function", "gelu_new")
        if activation not in GPT2_ACTIVATIONS:
            raise refuse(f"{cfg.model_type} activation {activation!r} is not supported",
                         f"reslab's GPT supports {', '.join(GPT2_ACTIVATIONS)}")
        inner = getattr(cfg, "n_inner", None)
        if inner is not None and inner != 4 * cfg.n_embd:
            raise refuse(f"{cfg.model_type} n_inner={inner} is not supported",
                         f"reslab's GPT MLP is 4 x n_embd = {4 * cfg.n_embd}")
        return {
            "vocab_size": cfg.vocab_size,
            "context": cfg.n_positions,
            "width": cfg.n_embd,
            "layers": cfg.n_layer,
            "heads": cfg.n_head,
            "bias": True,  # HF's GPT-2 always has biases
            "activation": GPT2_ACTIVATIONS[activation],
            "tie_embeddings": bool(getattr(cfg, "tie_word_embeddings", True)),
            "norm_eps": float(cfg.layer_norm_epsilon),
            "init_std": float(getattr(cfg, "initializer_range", 0.02)),
            "dropout": 0.0,  # converted models are for inference and analysis; set dropout yourself to fine-tune
            "residual": "pre",
        }

    def hf_config(self, c: Any, transformers: Any) -> Any:
        return transformers.GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.context, n_embd=c.width, n_layer=c.layers, n_head=c.heads,
            activation_function={"gelu-tanh": "gelu_new"}.get(c.activation, c.activation),
            layer_norm_epsilon=c.norm_eps, initializer_range=c.init_std,
            resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, tie_word_embeddings=c.tie_embeddings,
            bos_token_id=None, eos_token_id=None,  # reslab models know no tokenizer, so no special ids
        )

    def outer_weights(self, config: Any) -> tuple[Weight, ...]:
        return (weight("tok_emb.weight", "wte.weight"), weight("pos_emb.weight", "wpe.weight"),
                *_with_bias("norm", "ln_f"))

    def block_weights(self, config: Any) -> tuple[Weight, ...]:
        return tuple(w for names in GPT2_BLOCK_NAMES for w in _with_bias(*names))
