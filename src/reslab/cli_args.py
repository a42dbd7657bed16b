"""Flags generated from the typed configs, for `train`, `ablate`, `audit`, `bench`, `info` and `lens`.

A config field declared with `reslab.checks.option(..., flag=...)` becomes a flag (its type, help and, for training
fields, its default read from the declaration); the model flags are the union over the built-in model configs
(`reslab.models.configs.CONFIGS`), the scheme flags come from `reslab.registry.SCHEME_OPTIONS`. `--set KEY=VALUE`
sets any other field of the model's config or option of its scheme. Only what the user gives becomes an override
(each model keeps its defaults), and a setting the built model would not use is refused.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from reslab.checks import (
    Declared,
    OnlyWith,
    check_applies,
    check_declared,
    check_field_type,
    declarations,
)
from reslab.errors import ReslabError
from reslab.registry import MODELS, SCHEME_OPTIONS, TRANSFORMERS

SET_HELP = ("set a config field or residual scheme option (repeatable), e.g. --set norm_eps=1e-5; values parse as "
            "JSON (numbers, true/false, null, lists), else as a string")


def add_flags(group: argparse._ActionsContainer, fields: Iterable[Declared], lists: tuple[str, ...] = (),
              note: Callable[[Declared], str] = lambda field: "") -> None:
    """One flag per declared field, its value stored under the field's name and None when not given. A bool field
    is a switch: `--x/--no-x` when declared `flag=True`, else the one switch its flag names (`--no-diagnostics`).
    Flags named in `lists` take comma lists, as strings."""
    for field in fields:
        text = field.metadata.get("help", "") + note(field)
        if field.flag in lists:
            group.add_argument(field.flag, dest=field.name, help=f"{text} (comma list)")
        elif field.annotation is bool and field.metadata.get("flag") is True:
            group.add_argument(field.flag, dest=field.name, action=argparse.BooleanOptionalAction, help=text)
        elif field.annotation is bool:
            group.add_argument(field.flag, dest=field.name, action="store_const", help=text,
                               const=not field.flag.startswith("--no-"))
        else:
            group.add_argument(field.flag, dest=field.name, type=_value_type(field.annotation), help=text,
                               metavar=field.metadata.get("metavar"))


def _value_type(annotation: Any) -> type:
    """The type argparse converts a flag's text to: the annotation, less its `| None`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation


def flagged(fields: Iterable[Declared]) -> list[Declared]:
    return [field for field in fields if field.flag]


def given(args: argparse.Namespace, fields: Iterable[Declared]) -> dict[str, Any]:
    """The fields whose flags the user gave, by name."""
    values = {field.name: getattr(args, field.name, None) for field in fields}
    return {name: value for name, value in values.items() if value is not None}


def model_fields() -> dict[str, Declared]:
    """The model flags: every flagged field of a built-in model config, declared where first found."""
    from reslab.models.configs import CONFIGS

    fields: dict[str, Declared] = {}
    for config in CONFIGS.values():
        for field in flagged(declarations(config).values()):
            fields.setdefault(field.name, field)
    return fields


def scheme_fields() -> list[Declared]:
    """The built-in schemes' options as flags; a bool option is a pair of switches (`--hc-dynamic/--no-hc-dynamic`),
    so that one whose default is true can be turned off too."""
    return [Declared(name, kind, None, {"help": text, "flag": True}) for name, (kind, text) in SCHEME_OPTIONS.items()]


def _models_with(field: Declared) -> str:
    """The note after a model flag's help: the models that have its field, when not all transformers do."""
    from reslab.models.configs import CONFIGS

    having = [name for name in TRANSFORMERS if field.name in declarations(CONFIGS[name])]
    return "" if len(having) == len(TRANSFORMERS) else f" ({', '.join(having)})"


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str = "tiny",
                        lists: tuple[str, ...] = ()) -> None:
    """Add the model flags and --set. Flags named in `lists` (e.g. "--residual", "--layers") take comma lists."""
    group = parser.add_argument_group("model", "a shape flag left out takes the model's default: `reslab info "
                                      "--model NAME` lists them")
    group.add_argument("--model", help=f"one of {', '.join(MODELS)} (default {default_model})")
    parser.set_defaults(default_model=default_model)
    add_flags(group, model_fields().values(), lists, _models_with)
    add_flags(group, scheme_fields())
    group.add_argument("--set", action="append", metavar="KEY=VALUE", dest="sets", help=SET_HELP)


def model_name(args: argparse.Namespace) -> str:
    return args.model or args.default_model


def model_overrides(args: argparse.Namespace, model: str | None = None,
                    base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config overrides the user asked for, checked against the fields of `model` (default: --model's) and
    against what that config uses, starting from `base` (a recipe's or a saved run's values; default: its own)."""
    model = model or model_name(args)
    overrides = given_overrides(args, model, base)
    check_flags_apply(model, overrides, base)
    return overrides


def config_class(model: str) -> type:
    """Model `model`'s config class: from `reslab.models.configs` for a built-in (no torch), else its class's."""
    from reslab.models import get_model_class
    from reslab.models.configs import CONFIGS

    return CONFIGS.get(model) or get_model_class(model).config_class


def given_overrides(args: argparse.Namespace, model: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The overrides the flags and `--set` give, each checked to be a field of `model`'s config (or an option of
    its scheme); `base` holds the values the config starts from."""
    config = config_class(model)
    fields = declarations(config)
    overrides = given(args, model_fields().values())
    for name in overrides:
        if name not in fields:
            raise ReslabError(f"{_spelled(name)} does not apply to model {model!r}")
    options = given(args, scheme_fields())
    for key, value in parse_sets(getattr(args, "sets", None)).items():
        if key == "residual_options" and isinstance(value, dict):
            options.update(value)
        elif key in fields:
            overrides[key] = value
        else:
            options[key] = value
    if options:
        if "residual_options" not in fields:
            raise ReslabError(f"{_spelled(next(iter(options)))} does not apply to model {model!r}: it has no "
                              "residual scheme")
        scheme = overrides.get("residual") or (base or {}).get("residual") or fields["residual"].default
        overrides["residual_options"] = check_options(options, scheme, config)
    return overrides


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    from reslab.graph.targets import parse_sets

    return parse_sets(items) if items else {}


def check_options(options: dict[str, Any], scheme: str, config: type) -> dict[str, Any]:
    """Scheme options, each known (of `scheme` or of another built-in scheme: then `check_flags_apply` refuses it)
    and of its declared type; an unknown key is one line listing the valid keys."""
    from reslab.residual import get_scheme

    defaults = get_scheme(scheme).option_defaults
    for key, value in options.items():
        if key in SCHEME_OPTIONS:
            options[key] = check_field_type(_spelled(key), value, SCHEME_OPTIONS[key][0] | None)
        elif key in defaults:
            kind = Any if defaults[key] is None else type(defaults[key])
            options[key] = check_field_type(_spelled(key), value, kind)
        else:
            valid = sorted({*declarations(config), *SCHEME_OPTIONS, *defaults} - {"residual_options"})
            raise ReslabError(f"{config.__name__} has no field {key!r}, nor has scheme {scheme!r} such an option; "
                              f"valid --set keys: {', '.join(valid)}")
    return options


def check_flags_apply(model: str, overrides: dict[str, Any], base: dict[str, Any] | None = None) -> None:
    """Refuse a flag the built model would not use: a field that matters only when another is set (the config's
    `ONLY_WITH`), or a scheme option the chosen scheme does not have. One line naming the flag and the fix."""
    config = config_class(model)
    settings = {**config().to_dict(), **(base or {}), **overrides}
    check_applies(overrides, settings, config.declared("ONLY_WITH"), _spelled)
    if "residual" in settings:
        rules = _scheme_options(settings["residual"])
        check_applies(overrides.get("residual_options", {}), settings, rules, _spelled)


def _scheme_options(chosen: str) -> dict[str, OnlyWith]:
    """Each residual scheme option applies only with the schemes that declare it (their `option_defaults`): the
    built-in ones and the one `chosen`, which may be a plug-in."""
    from reslab.registry import SCHEMES
    from reslab.residual import get_scheme

    owners: dict[str, list[str]] = {}
    for scheme in dict.fromkeys([*SCHEMES, chosen]):
        for option in get_scheme(scheme).option_defaults:
            owners.setdefault(option, []).append(scheme)
    return {option: OnlyWith("residual", tuple(schemes)) for option, schemes in owners.items()}


def _spelled(name: str) -> str:
    """How a user sets config field (or scheme option) `name`: its flag, else `--set name`."""
    flags = {field.name: field.flag for field in [*model_fields().values(), *scheme_fields()]}
    return flags.get(name, f"--set {name}")


def model_flags_given(args: argparse.Namespace) -> list[str]:
    """The model flags (and --set) the user gave: the ones a run directory or an imported model refuses."""
    fields = [*model_fields().values(), *scheme_fields()]
    named = [field.flag for field in fields if getattr(args, field.name, None) is not None]
    for flag, dest in (("--model", "model"), ("--set", "sets")):
        if getattr(args, dest, None) is not None:
            named.insert(0, flag)
    return named


def model_from_args(args: argparse.Namespace, **extra):
    """Build the model the flags describe, after checking that its weights fit in memory."""
    from reslab.memory import check_fits
    from reslab.models import build_model, make_config

    name, overrides = model_name(args), {**model_overrides(args), **extra}
    check_fits(name, make_config(name, **overrides).to_dict())
    return build_model(name, **overrides)


# -- --config FILE: settings from a file, under the flags given ------------------------------------------------------

CONFIG_HELP = ("start from a settings file (TOML, YAML or JSON): model = NAME, [model_config] (model fields) and "
               "[train] (training settings), as in a run's config.json, which replays that run; flags given "
               "override it")
SECTIONS = ("model", "model_config", "train")
RECORDED = ("reslab_version", "data", "tokenizer", "command")  # the rest of a run's config.json: a record, not input


def add_config_argument(group: argparse._ActionsContainer, help: str = CONFIG_HELP) -> None:
    group.add_argument("--config", type=Path, metavar="FILE", help=help)


def read_settings(path: Path, sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """The settings in `path` (.toml, .yaml/.yml, .json), checked: each top-level key one of `sections` (or what a
    run's config.json also records, dropped), `train` of TrainConfig's fields and types, `model_config` of the
    model's. A bad file is one line naming it and the key. A run's recorded `stop_at` (one invocation's) is dropped,
    and `dtype_auto` always (how the dtype was picked: the recorded dtype is trained in)."""
    from reslab.data.sources import normalise_data
    from reslab.train.config import TrainConfig

    settings = _parse_settings(path)
    for key in settings:
        if key not in sections and key not in RECORDED:
            raise ReslabError(f"{path}: unknown key {key!r}{_section_hint(key)}; valid keys: {', '.join(sections)}")
    train = _section(settings, "train", path)
    _known_keys(train, declarations(TrainConfig), f"{path}: train", "training settings")
    train.pop("dtype_auto", None)
    if "reslab_version" in settings:
        train.pop("stop_at", None)
    settings["train"] = check_declared(train, TrainConfig, lambda name: f"{path}: train.{name}")
    if "data" in settings["train"]:
        settings["train"]["data"] = normalise_data(settings["train"]["data"])  # as --data: a path made absolute
    model = settings.get("model", train.pop("model", None))
    if model is not None and not isinstance(model, str):
        raise ReslabError(f"{path}: model must be a model name (a string), got {model!r}")
    settings["model"] = model
    settings["model_config"] = _section(settings, "model_config", path)
    return {key: value for key, value in settings.items() if key in sections}


def _parse_settings(path: Path) -> dict[str, Any]:
    from reslab.io import parse_json

    suffix, fix = path.suffix.lower(), "give a .toml, .yaml or .json settings file, or a run's config.json"
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ReslabError(f"--config {path}: unknown format {suffix or '(no suffix)'!r}; {fix}")
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError) as error:
        raise ReslabError(f"--config {path}: cannot read it ({error}); {fix}") from None
    if text is None:
        raise ReslabError(f"--config {path}: no such file; {fix}")
    if suffix == ".json":
        settings = parse_json(text, str(path), fix)
    else:
        settings = _parse_toml(text, path) if suffix == ".toml" else _parse_yaml(text, path)
    if not isinstance(settings, dict):
        raise ReslabError(f"{path}: the settings must be a table of keys, got {type(settings).__name__}; {fix}")
    return settings


def _parse_toml(text: str, path: Path) -> Any:
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ReslabError(f"{path} is not valid TOML ({error})") from None


def _parse_yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise ReslabError(f"--config {path}: YAML needs PyYAML, which is not installed: pip install pyyaml; or "
                          "give a .toml or .json file") from None
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as error:
        raise ReslabError(f"{path} is not valid YAML ({' '.join(str(error).split())})") from None


def _section(settings: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    value = settings.get(name, {})
    if not isinstance(value, dict):
        raise ReslabError(f"{path}: {name} must be a table of keys, got {value!r}")
    return dict(value)


def _known_keys(values: dict[str, Any], fields: dict[str, Any], where: str, what: str) -> None:
    for key in values:
        if key not in fields:
            raise ReslabError(f"{where}.{key} is not one of the {what}; valid: {', '.join(sorted(fields))}")


def _section_hint(key: str) -> str:
    """Where a setting given at the top level belongs."""
    from reslab.train.config import TrainConfig

    if key in declarations(TrainConfig):
        return " (a training setting: put it under [train])"
    if key in model_fields() or key in SCHEME_OPTIONS:
        return " (a model field: put it under [model_config])"
    return ""


def file_model_config(settings: dict[str, Any], model: str, path: Path) -> dict[str, Any]:
    """The file's model_config, each key a field of `model`'s config, of its declared type."""
    config = config_class(model)
    values = settings["model_config"]
    _known_keys(values, declarations(config), f"{path}: model_config", f"fields of model {model!r}")
    return check_declared(values, config, lambda name: f"{path}: model_config.{name}")
