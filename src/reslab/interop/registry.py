"""The model families reslab converts, by name: a new family is one adapter file plus one line in `ADAPTERS`."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from reslab.errors import ReslabError
from reslab.interop.base import HFAdapter
from reslab.interop.deepseek import DeepSeekV3
from reslab.interop.deepseek_v4 import DeepSeekV4
from reslab.interop.gpt2 import GPT2
from reslab.interop.llama import Llama
from reslab.models import get_model_class

ADAPTERS: dict[str, HFAdapter] = {
    "gpt2": GPT2(),
    "llama": Llama(),
    "deepseek": DeepSeekV3(),
    "deepseek-v4": DeepSeekV4(),
}


def supported_types() -> list[str]:
    """Every HF `model_type` some adapter reads, in registry order."""
    return [hf_type for adapter in ADAPTERS.values() for hf_type in adapter.hf_types]


def adapter_for_hf(hf_config: Any) -> HFAdapter:
    """The adapter reading `hf_config`'s model type; a ReslabError listing the supported types otherwise."""
    model_type = getattr(hf_config, "model_type", None)
    for adapter in ADAPTERS.values():
        if model_type in adapter.hf_types:
            return adapter
    raise unsupported_type(model_type)


def unsupported_type(model_type: Any) -> ReslabError:
    """The one line for an HF `model_type` no adapter reads, listing those they do."""
    return ReslabError(f"Hugging Face model type {model_type!r} is not supported; "
                       f"reslab converts: {', '.join(supported_types())}")


def adapter_for_name(name: str) -> HFAdapter:
    """The first adapter for reslab model `name`."""
    for adapter in ADAPTERS.values():
        if adapter.reslab_model == name:
            return adapter
    raise ReslabError(f"reslab model {name!r} has no Hugging Face equivalent; "
                      f"convert one of: {', '.join(_exportable())}")


def adapter_for_model(model: nn.Module) -> HFAdapter:
    """The first adapter whose reslab model class `model` is an instance of."""
    for adapter in ADAPTERS.values():
        if isinstance(model, get_model_class(adapter.reslab_model)):
            return adapter
    raise ReslabError(f"{type(model).__name__} has no Hugging Face equivalent; "
                      f"export one of: {', '.join(_exportable())}")


def _exportable() -> list[str]:
    return list(dict.fromkeys(adapter.reslab_model for adapter in ADAPTERS.values()))
