"""Model flags shared by `train`, `audit`, `bench`, `info`: one flag per config field, applied only when given, and
refused when the model would not use it."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from reslab.checks import OnlyWith, check_applies
from reslab.errors import ReslabError
from reslab.models import MODELS, get_model_class

# flag -> (config field, type, help). Only flags the user gives become overrides, so each model keeps its defaults.
MODEL_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--layers": ("layers", int, "number of transformer blocks"),
    "--width": ("width", int, "model (residual stream) width"),
    "--heads": ("heads", int, "attention heads"),
    "--kv-heads": ("kv_heads", int, "key/value heads for grouped-query attention (llama)"),
    "--head-dim": ("head_dim", int, "per-head dimension (llama; default width/heads)"),
    "--ffn-hidden": ("ffn_hidden", int, "SwiGLU hidden size (llama)"),
    "--context": ("context", int, "context length in tokens"),
    "--dropout": ("dropout", float, "dropout probability"),
    "--rope-theta": ("rope_theta", float, "RoPE base (llama)"),
    "--moe-experts": ("moe_experts", int, "routed experts per MoE layer (llama: 0 = dense FFN; deepseek)"),
    "--moe-top-k": ("moe_top_k", int, "experts each token is routed to (llama, deepseek)"),
    "--moe-shared": ("moe_shared", int, "always-on shared experts (llama, deepseek)"),
    "--moe-aux-weight": ("moe_aux_weight", float, "weight of the MoE load-balancing loss (llama, deepseek)"),
    "--activation": ("activation", str, "MLP activation (gpt): gelu-tanh (GPT-2, default), gelu (nanoGPT), relu, "
                     "relu2 (modded-nanogpt)"),
}
BOOL_FLAGS: dict[str, tuple[str, str]] = {
    "bias": ("bias", "biases in linear layers and norms (tiny, gpt)"),
    "tie-embeddings": ("tie_embeddings", "share the token embedding with the LM head (gpt, llama)"),
    "qk-norm": ("qk_norm", "per-head RMSNorm of queries and keys, as in Qwen3 (llama)"),
}
# Residual scheme hyper-parameters: flag -> option name in the scheme's `option_defaults`. A `bool` option is a
# switch (`--hc-dynamic`): given, it sets the option to true.
SCHEME_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--layerscale-init": ("layerscale_init", float, "LayerScale init (default: CaiT's rule by depth)"),
    "--rezero-init": ("rezero_init", float, "ReZero's initial alpha (default 0)"),
    "--streams": ("streams", int, "parallel residual streams n of hc and mhc (default 4)"),
    "--hc-dynamic": ("hc_dynamic", bool, "hc: dynamic, input-dependent connection weights (default static)"),
    "--sinkhorn-iters": ("sinkhorn_iters", int, "mhc: Sinkhorn-Knopp iterations (default 20)"),
    "--attnres-block": ("attnres_block", int, "attnres: transformer blocks per AttnRes block (default 0 = full)"),
    "--value-mix": ("value_mix", float, "value-residual: weight m of a layer's own values, lerp(v_1, v, m) (0.5)"),
    "--value-mix-learned": ("value_mix_learned", bool, "value-residual: learn m per head, starting at --value-mix"),
}


# flag -> the config field it sets, for every model and bool flag
_FIELD_FLAGS: dict[str, str] = {**{flag: name for flag, (name, *_) in MODEL_FLAGS.items()},
                                **{f"--{flag}": name for flag, (name, _) in BOOL_FLAGS.items()}}


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str = "tiny",
                        lists: tuple[str, ...] = ()) -> None:
    """Add the model flags. Flags named in `lists` (e.g. "--residual", "--layers") take comma lists as strings."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", help=f"one of {', '.join(MODELS)} (default {default_model})")
    parser.set_defaults(default_model=default_model)
    group.add_argument("--residual", help="residual scheme (see `reslab list`); default: the model's own"
                       + (" (comma list)" if "--residual" in lists else ""))
    for flag, (_, kind, text) in MODEL_FLAGS.items():
        if flag in lists:
            group.add_argument(flag, help=f"{text} (comma list)")
        else:
            group.add_argument(flag, type=kind, help=text)
    for flag, (_, text) in BOOL_FLAGS.items():
        group.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None, help=text)
    for flag, (_, kind, text) in SCHEME_FLAGS.items():
        if kind is bool:
            group.add_argument(flag, action="store_true", default=None, help=text)
        else:
            group.add_argument(flag, type=kind, help=text)


def model_name(args: argparse.Namespace) -> str:
    return args.model or args.default_model


def model_overrides(args: argparse.Namespace, model: str | None = None,
                    base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config overrides the user asked for, checked against the fields of `model` (default: --model's) and
    against what that config uses, starting from `base` (a recipe's or a saved run's values; default: its own)."""
    model = model or model_name(args)
    overrides = given_overrides(args, model)
    check_flags_apply(model, overrides, base)
    return overrides


def given_overrides(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """The overrides the flags give, each checked to be a field of `model`'s config (or an option of its scheme)."""
    fields = {f.name for f in dataclasses.fields(get_model_class(model).config_class)}
    overrides: dict[str, Any] = {}
    for flag, name in (*_FIELD_FLAGS.items(), ("--residual", "residual")):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if name not in fields:
            raise ReslabError(f"{flag} does not apply to model {model!r}")
        overrides[name] = value
    options = {name: getattr(args, flag[2:].replace("-", "_")) for flag, (name, *_) in SCHEME_FLAGS.items()}
    options = {k: v for k, v in options.items() if v is not None}
    if options:
        if "residual_options" not in fields:
            raise ReslabError(f"{_spelled(next(iter(options)))} does not apply to model {model!r}: it has no "
                              "residual scheme")
        overrides["residual_options"] = options
    return overrides


def check_flags_apply(model: str, overrides: dict[str, Any], base: dict[str, Any] | None = None) -> None:
    """Refuse a flag the built model would not use: a field that matters only when another is set (the config's
    `ONLY_WITH`), or a scheme option the chosen scheme does not have. One line naming the flag and the fix."""
    config_class = get_model_class(model).config_class
    settings = {**config_class().to_dict(), **(base or {}), **overrides}
    check_applies(overrides, settings, config_class.declared("ONLY_WITH"), _spelled)
    check_applies(overrides.get("residual_options", {}), settings, _scheme_options(), _spelled)


def _scheme_options() -> dict[str, OnlyWith]:
    """Each residual scheme option applies only with the schemes that declare it (their `option_defaults`)."""
    from reslab.residual import SCHEMES, get_scheme

    owners: dict[str, list[str]] = {}
    for scheme in SCHEMES:
        for option in get_scheme(scheme).option_defaults:
            owners.setdefault(option, []).append(scheme)
    return {option: OnlyWith("residual", tuple(schemes)) for option, schemes in owners.items()}


def _spelled(name: str) -> str:
    """How a user sets config field (or scheme option) `name`: its flag, or the name itself (audit's --set)."""
    flags = {field: flag for flag, field in _FIELD_FLAGS.items()}
    flags.update({option: flag for flag, (option, *_) in SCHEME_FLAGS.items()}, residual="--residual")
    return flags.get(name, name)


def model_from_args(args: argparse.Namespace, **extra):
    """Build the model the flags describe, after checking that its weights fit in memory."""
    from reslab.memory import check_fits
    from reslab.models import build_model, make_config

    name, overrides = model_name(args), {**model_overrides(args), **extra}
    check_fits(name, make_config(name, **overrides).to_dict())
    return build_model(name, **overrides)
