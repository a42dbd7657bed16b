"""The model zoo, by name. `build_model(name, **overrides)` builds any of them from its typed config."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from reslab.errors import unknown
from reslab.registry import MODELS, TRANSFORMERS

if TYPE_CHECKING:  # `reslab.models` loads torch only when a model is built, so the CLI starts fast
    import torch.nn as nn


def get_model_class(name: str) -> type[nn.Module]:
    if name not in MODELS:
        raise unknown("model", name, MODELS)
    module, _, attr = MODELS[name].partition(":")
    return getattr(import_module(module), attr)


def make_config(name: str, **overrides):
    """The validated config of model `name` with `overrides` applied."""
    return get_model_class(name).config_class.from_dict(overrides)


def check_saved_model_config(name: str, values: dict, source) -> None:
    """A model config read back from a file: a known model, every field present, each valid (one error line)."""
    from reslab.errors import ReslabError

    if not isinstance(name, str) or name not in MODELS:
        raise ReslabError(f"{source}: unknown model {name!r}; restore the file from a copy")
    config = make_config(name, **values)
    missing = sorted(set(config.to_dict()) - set(values))
    if missing:
        raise ReslabError(f"{source}: model_config lacks {missing[0]!r}; restore the file from a copy")


def build_model(name: str, **overrides) -> nn.Module:
    """Build model `name` ('mlp', 'tiny', 'gpt', 'llama', 'deepseek') with config fields overridden by keyword.

    A language model is checked against `reslab.contracts` once, here: a missing member is one error line."""
    model = get_model_class(name)(make_config(name, **overrides))
    if name in TRANSFORMERS:
        from reslab.contracts import check_language_model

        check_language_model(model)
    return model


def list_models() -> list[str]:
    return list(MODELS)
