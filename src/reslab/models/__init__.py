"""The model zoo, by name. `build_model(name, **overrides)` builds any of them from its typed config."""

from importlib import import_module

import torch.nn as nn

from reslab.errors import unknown

MODELS: dict[str, str] = {
    "mlp": "reslab.models.mlp:DeepMLP",
    "tiny": "reslab.models.tiny:TinyTransformer",
    "gpt": "reslab.models.gpt:GPT",
    "llama": "reslab.models.llama:Llama",
    "deepseek": "reslab.models.deepseek:DeepSeek",
}
TRANSFORMERS = ("tiny", "gpt", "llama", "deepseek")


def get_model_class(name: str) -> type[nn.Module]:
    if name not in MODELS:
        raise unknown("model", name, MODELS)
    module, _, attr = MODELS[name].partition(":")
    return getattr(import_module(module), attr)


def make_config(name: str, **overrides):
    """The validated config of model `name` with `overrides` applied."""
    return get_model_class(name).config_class.from_dict(overrides)


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
