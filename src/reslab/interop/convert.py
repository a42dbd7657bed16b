"""The generic conversion, driven by the family adapters' tables: configs and state dicts, both directions.

Nothing here names a model family: it finds the adapter (`registry.py`) and follows what that adapter declares.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from reslab.errors import ReslabError
from reslab.interop.base import HFAdapter, check_refusals, require_transformers
from reslab.interop.registry import adapter_for_hf, adapter_for_model, adapter_for_name
from reslab.models import get_model_class, make_config

# --- configs ---------------------------------------------------------------------------------------------------


def config_from_hf(hf_config: Any) -> tuple[str, dict[str, Any]]:
    """The reslab model name and config overrides that compute what `hf_config`'s model computes.

    Raises ReslabError for a model type or feature reslab does not implement, so no conversion is ever lossy.
    """
    adapter = adapter_for_hf(hf_config)
    check_refusals(adapter, hf_config)
    return adapter.reslab_model, adapter.overrides(hf_config)


def to_hf_config(model: nn.Module) -> Any:
    """The `transformers` config (GPT2Config, LlamaConfig, Qwen3Config, ...) of an exportable reslab model."""
    adapter = _exporter(model)
    return adapter.hf_config(model.config, require_transformers("building a Hugging Face config"))


# --- weights: HF -> reslab --------------------------------------------------------------------------------------


class _Weights:
    """HF tensors by name, handed out once each, so leftovers and missing weights are both errors naming the key."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], prefix: str):
        # checkpoints saved from the base model (the original `gpt2` on the Hub, for one) have no prefix
        self.tensors = {key.removeprefix(prefix): value for key, value in tensors.items()}

    def take(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise ReslabError(f"the Hugging Face weights lack {key!r}; the checkpoint does not match its config")
        return self.tensors.pop(key)

    def drop(self, key: str) -> None:
        """Discard a weight reslab does not need (a tied head stored anyway)."""
        self.tensors.pop(key, None)

    def check_used(self, ignored_suffixes: tuple[str, ...]) -> None:
        leftover = sorted(key for key in self.tensors if not key.endswith(ignored_suffixes))
        if leftover:
            raise ReslabError(f"the Hugging Face weights have {leftover[0]!r}, which reslab has no place for "
                              f"({len(leftover)} unused in all); the checkpoint does not match its config")


def convert_state_dict(name: str, overrides: Mapping[str, Any],
                       hf_tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """reslab's state dict for model `name` with `overrides` (from `config_from_hf`), from HF-named tensors."""
    return _to_reslab(adapter_for_name(name), make_config(name, **overrides), hf_tensors)


def _to_reslab(adapter: HFAdapter, config: Any, hf_tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weights = _Weights(adapter.module_layout(hf_tensors), adapter.hf_prefix)
    state = {}
    for w in adapter.weight_table(config):
        parts = [weights.take(key) for key in w.hf]
        parts = [part.t() for part in parts] if w.transpose else parts
        state[w.reslab] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if getattr(config, "tie_embeddings", False):
        weights.drop(adapter.hf_head)
        state["head.weight"] = state["tok_emb.weight"]
    else:
        state["head.weight"] = weights.take(adapter.hf_head)
    weights.check_used(adapter.ignored_suffixes)
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


def build_loaded(hf_config: Any, hf_tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """The reslab model (float32, eval mode) of `hf_config`, holding `hf_tensors` (HF-named) as its weights."""
    name, overrides = config_from_hf(hf_config)
    config = make_config(name, **overrides)
    model = get_model_class(name)(config)
    load_state_strict(model, _to_reslab(adapter_for_hf(hf_config), config, hf_tensors))
    return model.eval()


def from_hf(hf_model: nn.Module) -> nn.Module:
    """A reslab model (float32, eval mode) with the weights and behaviour of a `transformers` model.

    Accepts the *ForCausalLM classes and the bare base models (a tied head is then rebuilt from the embedding).
    """
    return build_loaded(hf_model.config, hf_model.state_dict())


# --- reslab -> HF -----------------------------------------------------------------------------------------------


def _exporter(model: nn.Module) -> HFAdapter:
    """The adapter of a model that has a Hugging Face equivalent: a registered family with HF's residual scheme."""
    adapter = adapter_for_model(model)
    if model.config.residual != adapter.residual:
        raise ReslabError(f"residual scheme {model.config.residual!r} has no Hugging Face equivalent; "
                          f"only residual={adapter.residual!r} models can be exported")
    return adapter


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF-named tensors for the *ForCausalLM class of `to_hf_config(model)`, from a reslab model.

    Where the HF family always has biases and the reslab model has none, zeros stand in: the function is the same.
    """
    adapter = _exporter(model)
    state = {key: value.detach() for key, value in model.state_dict().items()}
    hf = {}
    for w in adapter.weight_table(model.config):
        tensor = state.get(w.reslab)
        if tensor is None and w.bias_of is not None:
            tensor = torch.zeros(state[w.bias_of].shape[0], dtype=state[w.bias_of].dtype)
        parts = tensor.split(w.sizes(model.config), dim=0) if w.sizes else (tensor,)
        for key, part in zip(w.hf, parts, strict=True):
            hf[adapter.hf_prefix + key] = part.t().contiguous() if w.transpose else part
    hf[adapter.hf_head] = state["head.weight"]
    return hf
