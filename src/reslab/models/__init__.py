"""The model zoo, by name. `build_model(name, **overrides)` builds any of them from its typed config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from reslab.registry import MODELS, TRANSFORMERS, load, names

if TYPE_CHECKING:  # `reslab.models` loads torch only when a model is built, so the CLI starts fast
    import torch.nn as nn


def get_model_class(name: str) -> type[nn.Module]:
    """The model class registered under `name`, built in or a plug-in's (entry-point group `reslab.models`)."""
    return load("model", name)


def make_config(name: str, **overrides):
    """The validated config of model `name` with `overrides` applied."""
    return get_model_class(name).config_class.from_dict(overrides)


def check_saved_model_config(name: str, values: dict, source) -> None:
    """A model config read back from a file: a known model, every field present, each valid (one error line)."""
    from reslab.errors import ReslabError

    if not isinstance(name, str) or name not in list_models():
        raise ReslabError(f"{source}: unknown model {name!r}; restore the file from a copy")
    config = make_config(name, **values)
    missing = sorted(set(config.to_dict()) - set(values))
    if missing:
        raise ReslabError(f"{source}: model_config lacks {missing[0]!r}; restore the file from a copy")


def build_model(name: str, **overrides) -> nn.Module:
    """Build model `name` ('mlp', 'tiny', 'gpt', 'llama', 'deepseek') with config fields overridden by keyword.

    A language model is checked against `reslab.contracts` once, here: a missing member is one error line."""
    model = get_model_class(name)(make_config(name, **overrides))
    if name in TRANSFORMERS or name not in MODELS:  # a plug-in model is held to the same contract
        from reslab.contracts import check_language_model

        check_language_model(model)
    return model


def list_models() -> list[str]:
    """Every model's name, the plug-ins' included."""
    return names("model")
