"""Hugging Face interop: reslab models from `transformers` models or local HF checkpoints, and back.

Why this exists: reslab's GPT-2 and Llama-family models are only a trustworthy lab if they compute what the
reference implementations compute. Loading real weights proves it (the tests compare logits with `transformers`),
and it lets users study the residual stream of published checkpoints with reslab's probes.

Supported: GPT-2 (`gpt2`) as reslab's `gpt`; Llama (`llama`), Mistral without a sliding window (`mistral`) and
Qwen3 (`qwen3`, with QK-norm) as reslab's `llama`. Anything the reslab model would compute differently (biases
it lacks, RoPE scaling, sliding windows, another activation) is refused with a ReslabError instead of being
loaded into a model that silently disagrees with the original.

Checkpoints are read from safetensors only (never pickle), from a local directory only (never the network).
`transformers` is imported lazily, only where a config has to be parsed or built.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from reslab.errors import ReslabError
from reslab.models import build_model

GPT2_TYPES = ("gpt2",)
LLAMA_TYPES = ("llama", "mistral", "qwen3")
SUPPORTED_TYPES = GPT2_TYPES + LLAMA_TYPES

# The prefix HF's *ForCausalLM classes put before the base model's weights; checkpoints saved from the base model
# (the original `gpt2` on the Hub, for one) have no prefix.
BASE_PREFIX = {"gpt": "transformer.", "llama": "model."}

# Buffers some HF versions store in checkpoints that carry no learned weights: GPT-2's causal-mask `attn.bias`
# and `attn.masked_bias`, and old Llama's RoPE `inv_freq`. reslab recomputes all three.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")

# HF activation_function -> reslab's gpt activation ("gelu_new" and "gelu_pytorch_tanh" are both the tanh GELU)
GPT2_ACTIVATIONS = {"gelu_new": "gelu-tanh", "gelu_pytorch_tanh": "gelu-tanh", "gelu": "gelu", "relu": "relu",
                    "relu2": "relu2"}

HF_INSTALL_HINT = 'install it with: pip install "reslab[hf]"'


# --- configs ---------------------------------------------------------------------------------------------------


def config_from_hf(hf_config: Any) -> tuple[str, dict[str, Any]]:
    """The reslab model name and config overrides that compute what `hf_config`'s model computes.

    Raises ReslabError for a model type or feature reslab does not implement, so no conversion is ever lossy.
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type in GPT2_TYPES:
        return "gpt", _gpt2_overrides(hf_config)
    if model_type in LLAMA_TYPES:
        return "llama", _llama_overrides(hf_config)
    raise ReslabError(f"Hugging Face model type {model_type!r} is not supported; "
                      f"reslab converts: {', '.join(SUPPORTED_TYPES)}")


def _refuse(problem: str, fix: str) -> ReslabError:
    return ReslabError(f"{problem}; {fix}")


def _gpt2_overrides(cfg: Any) -> dict[str, Any]:
    """GPT-2 maps onto reslab's pre-LN `gpt` with biases; the MLP must be 4x wide and attention 1/sqrt(d) scaled."""
    activation = getattr(cfg, "activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        raise _refuse(f"GPT-2 activation {activation!r} is not supported",
                      f"reslab's GPT supports {', '.join(GPT2_ACTIVATIONS)}")
    inner = getattr(cfg, "n_inner", None)
    if inner is not None and inner != 4 * cfg.n_embd:
        raise _refuse(f"GPT-2 n_inner={inner} is not supported", f"reslab's GPT MLP is 4 x n_embd = {4 * cfg.n_embd}")
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        raise _refuse("GPT-2 scale_attn_by_inverse_layer_idx=True is not supported",
                      "reslab scales attention by 1/sqrt(head_dim) only; use a checkpoint trained without it")
    if not getattr(cfg, "scale_attn_weights", True):
        raise _refuse("GPT-2 scale_attn_weights=False is not supported",
                      "reslab always scales attention by 1/sqrt(head_dim)")
    if getattr(cfg, "add_cross_attention", False):
        raise _refuse("GPT-2 with cross-attention is not supported", "reslab converts decoder-only GPT-2")
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


def _llama_overrides(cfg: Any) -> dict[str, Any]:
    """Llama, Mistral and Qwen3 map onto reslab's `llama`: bias-free GQA with RoPE and a SwiGLU FFN."""
    model_type = cfg.model_type
    activation = getattr(cfg, "hidden_act", "silu")
    if activation != "silu":
        raise _refuse(f"{model_type} hidden_act={activation!r} is not supported", "reslab's SwiGLU uses silu")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(cfg, flag, False):
            raise _refuse(f"{model_type} {flag}=True is not supported", "reslab's llama has no biases in its linears")
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
        "qk_norm": model_type == "qwen3",
        "tie_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "norm_eps": float(cfg.rms_norm_eps),
        "init_std": float(getattr(cfg, "initializer_range", 0.02)),
        "dropout": 0.0,
        "residual": "pre",
    }


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
        raise _refuse(f"{cfg.model_type} RoPE scaling {kind!r} is not supported",
                      "reslab implements plain RoPE only; use a checkpoint with rope_type 'default'")
    partial = settings.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise _refuse(f"{cfg.model_type} partial_rotary_factor={partial} is not supported",
                      "reslab rotates every channel of each head")
    return float(settings.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _check_full_attention(cfg: Any, context: int) -> None:
    """Refuse local (sliding-window) attention unless the window covers the whole context, where it is a no-op."""
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        other = sorted({kind for kind in layer_types if kind != "full_attention"})
        if other:
            raise _refuse(f"{cfg.model_type} layer type {other[0]!r} is not supported",
                          "reslab implements full causal attention only (turn off use_sliding_window)")
        return
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) and window is not None and window < context:
        raise _refuse(f"{cfg.model_type} sliding_window={window} is shorter than the context {context}",
                      "reslab implements full causal attention only; use a checkpoint with sliding_window null")


# --- weights: HF -> reslab --------------------------------------------------------------------------------------


class _Weights:
    """HF tensors by name, handed out once each, so leftovers and missing weights are both errors naming the key."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], prefix: str):
        self.tensors = {_strip(key, prefix): value for key, value in tensors.items()}

    def take(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise ReslabError(f"the Hugging Face weights lack {key!r}; the checkpoint does not match its config")
        return self.tensors.pop(key)

    def drop(self, key: str) -> None:
        """Discard a weight reslab does not need (a tied head stored anyway)."""
        self.tensors.pop(key, None)

    def check_used(self) -> None:
        leftover = sorted(key for key in self.tensors if not key.endswith(IGNORED_SUFFIXES))
        if leftover:
            raise ReslabError(f"the Hugging Face weights have {leftover[0]!r}, which reslab has no place for "
                              f"({len(leftover)} unused in all); the checkpoint does not match its config")


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def convert_state_dict(name: str, overrides: Mapping[str, Any],
                       hf_tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """reslab's state dict for model `name` with `overrides` (from `config_from_hf`), from HF-named tensors."""
    weights = _Weights(hf_tensors, BASE_PREFIX[name])
    convert = _gpt2_to_reslab if name == "gpt" else _llama_to_reslab
    state = convert(weights, overrides)
    if overrides["tie_embeddings"]:
        weights.drop("lm_head.weight")
        state["head.weight"] = state["tok_emb.weight"]
    else:
        state["head.weight"] = weights.take("lm_head.weight")
    weights.check_used()
    return state


# (reslab name, HF GPT-2 name, stored transposed by HF's Conv1D?) for the modules of one block, both directions.
GPT2_BLOCK_NAMES = (
    ("attn_residual.norm", "ln_1", False),
    ("attn.qkv", "attn.c_attn", True),
    ("attn.out", "attn.c_proj", True),
    ("ffn_residual.norm", "ln_2", False),
    ("ffn.up", "mlp.c_fc", True),
    ("ffn.down", "mlp.c_proj", True),
)


def _gpt2_to_reslab(weights: _Weights, overrides: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """GPT-2's Conv1D stores (in, out), so every matrix is transposed; c_attn is already fused q|k|v like `qkv`."""
    state = {"tok_emb.weight": weights.take("wte.weight"), "pos_emb.weight": weights.take("wpe.weight")}
    for i in range(overrides["layers"]):
        ours, theirs = f"blocks.{i}.", f"h.{i}."
        for reslab_name, hf_name, transpose in GPT2_BLOCK_NAMES:
            weight = weights.take(f"{theirs}{hf_name}.weight")
            state[f"{ours}{reslab_name}.weight"] = weight.t() if transpose else weight
            state[f"{ours}{reslab_name}.bias"] = weights.take(f"{theirs}{hf_name}.bias")
    state["norm.weight"] = weights.take("ln_f.weight")
    state["norm.bias"] = weights.take("ln_f.bias")
    return state


def _llama_to_reslab(weights: _Weights, overrides: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """q, k, v stack into `qkv` and gate, up into `gate_up`, in the order reslab splits them."""
    state = {"tok_emb.weight": weights.take("embed_tokens.weight")}
    for i in range(overrides["layers"]):
        ours, theirs = f"blocks.{i}.", f"layers.{i}."
        attn, mlp = f"{theirs}self_attn.", f"{theirs}mlp."
        state[f"{ours}attn_residual.norm.weight"] = weights.take(f"{theirs}input_layernorm.weight")
        state[f"{ours}attn.qkv.weight"] = torch.cat(
            [weights.take(f"{attn}{p}_proj.weight") for p in ("q", "k", "v")], dim=0)
        state[f"{ours}attn.out.weight"] = weights.take(f"{attn}o_proj.weight")
        if overrides["qk_norm"]:
            state[f"{ours}attn.q_norm.weight"] = weights.take(f"{attn}q_norm.weight")
            state[f"{ours}attn.k_norm.weight"] = weights.take(f"{attn}k_norm.weight")
        state[f"{ours}ffn_residual.norm.weight"] = weights.take(f"{theirs}post_attention_layernorm.weight")
        state[f"{ours}ffn.gate_up.weight"] = torch.cat(
            [weights.take(f"{mlp}gate_proj.weight"), weights.take(f"{mlp}up_proj.weight")], dim=0)
        state[f"{ours}ffn.down.weight"] = weights.take(f"{mlp}down_proj.weight")
    state["norm.weight"] = weights.take("norm.weight")
    return state


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """`model.load_state_dict` that names the first missing, unexpected or mis-shaped key in a ReslabError."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ReslabError(f"no weight for {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ReslabError(f"unexpected weight {unexpected[0]!r}: the model has no such parameter")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ReslabError(f"weight {key!r} has shape {tuple(tensor.shape)} but the model expects "
                              f"{tuple(expected[key].shape)}; the config and the weights disagree")
    model.load_state_dict(state, strict=True)  # copies, casting to the model's dtype


def _build_loaded(name: str, overrides: dict[str, Any], hf_tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    state = convert_state_dict(name, overrides, hf_tensors)
    model = build_model(name, **overrides)
    load_state_strict(model, state)
    return model.eval()


def from_hf(hf_model: nn.Module) -> nn.Module:
    """A reslab model (float32, eval mode) with the weights and behaviour of a `transformers` model.

    Accepts the *ForCausalLM classes and the bare base models (a tied head is then rebuilt from the embedding).
    """
    name, overrides = config_from_hf(hf_model.config)
    return _build_loaded(name, overrides, hf_model.state_dict())


# --- local checkpoints ------------------------------------------------------------------------------------------


def load_hf_checkpoint(directory: str | Path) -> nn.Module:
    """A reslab model from a local HF checkpoint directory: config.json plus *.safetensors (sharded or not).

    Offline by design: nothing is fetched. Pickled weights (pytorch_model.bin) are refused since unpickling can
    run arbitrary code.
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ReslabError(f"{directory} has no config.json; give the directory written by save_pretrained")
    files = safetensors_files(directory)
    name, overrides = config_from_hf(read_hf_config(directory))
    return _build_loaded(name, overrides, dict(_read_tensors(files)))


def read_hf_config(directory: Path) -> Any:
    """The directory's config.json parsed by transformers (which fills in each model type's defaults)."""
    transformers = require_transformers("reading a Hugging Face config")
    try:
        return transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (ValueError, KeyError, OSError) as error:
        raise ReslabError(f"cannot read {directory / 'config.json'}: {error}") from None


def require_transformers(purpose: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise ReslabError(f"{purpose} needs the transformers package; {HF_INSTALL_HINT}") from None
    return transformers


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint: those its shard index names, else model.safetensors, else *.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / shard for shard in shards]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise ReslabError(f"{index.name} names {absent[0]}, which does not exist; copy the complete checkpoint")
        return files
    single = directory / "model.safetensors"
    files = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickled:
        raise ReslabError(f"{directory} holds {pickled[0]} but reslab loads safetensors only (pickle can run code); "
                          "re-save it with save_pretrained(directory, safe_serialization=True)")
    raise ReslabError(f"{directory} has no *.safetensors weights")


def _read_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    for file in files:
        yield from load_file(str(file)).items()


# --- reslab -> HF -----------------------------------------------------------------------------------------------


def _check_exportable(model: nn.Module) -> str:
    """The reslab model name, if the model has a Hugging Face equivalent: GPT or Llama, pre-LN, one stream."""
    from reslab.models.gpt import GPT
    from reslab.models.llama import Llama

    if not isinstance(model, (GPT, Llama)):
        raise ReslabError(f"{type(model).__name__} has no Hugging Face equivalent; export a gpt or llama model")
    if model.config.residual != "pre":
        raise ReslabError(f"residual scheme {model.config.residual!r} has no Hugging Face equivalent; "
                          "only residual='pre' models can be exported")
    return "gpt" if isinstance(model, GPT) else "llama"


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF-named tensors (for GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM) from a reslab model.

    A bias-free reslab GPT gets zero biases, since HF's GPT-2 always has them: the function computed is the same.
    """
    name = _check_exportable(model)
    state = {key: value.detach() for key, value in model.state_dict().items()}
    layers = model.config.layers
    if name == "gpt":
        base = _gpt2_from_reslab(state, layers)
    else:
        base = _llama_from_reslab(state, layers, model.config.qk_norm)
    hf = {BASE_PREFIX[name] + key: value for key, value in base.items()}
    hf["lm_head.weight"] = state["head.weight"]
    return hf


def _gpt2_from_reslab(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    def bias(key: str, size: int) -> torch.Tensor:
        return state.get(key, torch.zeros(size, dtype=state["tok_emb.weight"].dtype))

    out = {"wte.weight": state["tok_emb.weight"], "wpe.weight": state["pos_emb.weight"]}
    for i in range(layers):
        ours, theirs = f"blocks.{i}.", f"h.{i}."
        for reslab_name, hf_name, transpose in GPT2_BLOCK_NAMES:
            weight = state[f"{ours}{reslab_name}.weight"]
            out[f"{theirs}{hf_name}.weight"] = weight.t().contiguous() if transpose else weight
            size = weight.shape[0]  # output features of a Linear, features of a norm
            out[f"{theirs}{hf_name}.bias"] = bias(f"{ours}{reslab_name}.bias", size)
    out["ln_f.weight"] = state["norm.weight"]
    out["ln_f.bias"] = bias("norm.bias", state["norm.weight"].shape[0])
    return out


def _llama_from_reslab(state: dict[str, torch.Tensor], layers: int, qk_norm: bool) -> dict[str, torch.Tensor]:
    out = {"embed_tokens.weight": state["tok_emb.weight"]}
    for i in range(layers):
        ours, theirs = f"blocks.{i}.", f"layers.{i}."
        attn, mlp = f"{theirs}self_attn.", f"{theirs}mlp."
        out[f"{theirs}input_layernorm.weight"] = state[f"{ours}attn_residual.norm.weight"]
        q, k, v = state[f"{ours}attn.qkv.weight"].split(_qkv_sizes(state, ours), dim=0)
        out[f"{attn}q_proj.weight"], out[f"{attn}k_proj.weight"], out[f"{attn}v_proj.weight"] = q, k, v
        out[f"{attn}o_proj.weight"] = state[f"{ours}attn.out.weight"]
        if qk_norm:
            out[f"{attn}q_norm.weight"] = state[f"{ours}attn.q_norm.weight"]
            out[f"{attn}k_norm.weight"] = state[f"{ours}attn.k_norm.weight"]
        out[f"{theirs}post_attention_layernorm.weight"] = state[f"{ours}ffn_residual.norm.weight"]
        gate, up = state[f"{ours}ffn.gate_up.weight"].chunk(2, dim=0)
        out[f"{mlp}gate_proj.weight"], out[f"{mlp}up_proj.weight"] = gate, up
        out[f"{mlp}down_proj.weight"] = state[f"{ours}ffn.down.weight"]
    out["norm.weight"] = state["norm.weight"]
    return out


def _qkv_sizes(state: dict[str, torch.Tensor], block: str) -> list[int]:
    """Rows of q, k and v in a fused qkv: q has as many rows as the output projection has inputs."""
    q_size = state[f"{block}attn.out.weight"].shape[1]
    kv_size = (state[f"{block}attn.qkv.weight"].shape[0] - q_size) // 2
    return [q_size, kv_size, kv_size]


def to_hf_config(model: nn.Module) -> Any:
    """The `transformers` config (GPT2Config, LlamaConfig or Qwen3Config) of a reslab gpt or llama model."""
    name = _check_exportable(model)
    transformers = require_transformers("building a Hugging Face config")
    c = model.config
    if name == "gpt":
        return transformers.GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.context, n_embd=c.width, n_layer=c.layers, n_head=c.heads,
            activation_function={"gelu-tanh": "gelu_new"}.get(c.activation, c.activation),
            layer_norm_epsilon=c.norm_eps, initializer_range=c.init_std,
            resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, tie_word_embeddings=c.tie_embeddings,
            bos_token_id=None, eos_token_id=None,  # reslab models know no tokenizer, so no special ids
        )
    common = dict(
        vocab_size=c.vocab_size, max_position_embeddings=c.context, hidden_size=c.width, num_hidden_layers=c.layers,
        num_attention_heads=c.heads, num_key_value_heads=c.kv_heads, head_dim=c.head_dim or c.width // c.heads,
        intermediate_size=c.hidden, hidden_act="silu", rms_norm_eps=c.norm_eps, initializer_range=c.init_std,
        attention_dropout=c.dropout, tie_word_embeddings=c.tie_embeddings, bos_token_id=None, eos_token_id=None,
        rope_theta=c.rope_theta,  # transformers 5 moves it into rope_parameters itself
    )
    config_class = transformers.Qwen3Config if c.qk_norm else transformers.LlamaConfig
    return config_class(**common)
