"""The one validation layer for numbers a user gives: flags, config fields, `--set` values; and for settings that
matter only when another is set (`OnlyWith`), given alone.

Every command and every config checks its numbers here, so `--lr nan`, `--beta1 1.5`, `--top-p 0` or
`--set layers=abc` end the same way everywhere: one `ReslabError` line naming the flag, what it must be and what
was given.

    check_number("lr", value, Range(low=0, low_open=True))     # finite and > 0
    check_numbers(values, {"beta1": PROBABILITY, ...})
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from reslab.errors import ReslabError


@dataclass(frozen=True)
class Range:
    """An admissible interval for a number: finite always; `integer` for counts; open or closed ends."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return kind + (" " + " and ".join(bounds) if bounds else "")

    def admits(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))


POSITIVE = Range(low=0, low_open=True)  # a finite number > 0 (learning rates, timeouts)
NON_NEGATIVE = Range(low=0)
COUNT = Range(low=1, integer=True)  # an integer >= 1 (steps, batch, layers)
NON_NEGATIVE_INT = Range(low=0, integer=True)
UNIT = Range(low=0, high=1)  # [0, 1]
BETA = Range(low=0, high=1, high_open=True)  # [0, 1): Adam betas, dropout
SEED = Range(low=0, high=2**63 - 1, integer=True)
FINITE = Range()


def flag_name(name: str) -> str:
    """The command-line spelling of a config field: `min_lr` -> `--min-lr`."""
    return "--" + name.replace("_", "-")


def check_number(name: str, value: Any, allowed: Range, flag: str | None = None) -> None:
    """Raise one ReslabError line if `value` is not admitted by `allowed`; None means 'not given' and passes."""
    if value is None or allowed.admits(value):
        return
    raise ReslabError(f"{flag or flag_name(name)} must be {allowed.describe()}, got {value!r}")


def check_numbers(values: dict[str, Any], ranges: dict[str, Range], flags: dict[str, str] | None = None) -> None:
    """`check_number` for each named value that has a range; the first failure is raised."""
    for name, allowed in ranges.items():
        if name in values:
            check_number(name, values[name], allowed, (flags or {}).get(name))


def option(default: Any = dataclasses.MISSING, *, help: str = "", range: Range | None = None,
           flag: bool | str = False, metavar: str | None = None, runtime: bool = False, **kwargs) -> Any:
    """A config field and its declaration, the one place its help, admissible range and command-line flag are
    written: `flag=True` makes `--name` (a bool field: `--name/--no-name`), a string names the flag (a bool field's
    `--no-x` sets it false, any other switch true). Every field of a model config is also settable by `--set`."""
    declared = {"help": help, "range": range, "flag": flag, "metavar": metavar, "runtime": runtime}
    return dataclasses.field(default=default, metadata={k: v for k, v in declared.items() if v}, **kwargs)


@dataclass(frozen=True)
class Declared:
    """What a config class declares about one field: its type annotation, its default in that class and its
    `option` metadata (inherited from the nearest base class that declares it)."""

    name: str
    annotation: Any
    default: Any
    metadata: Mapping[str, Any]

    @property
    def flag(self) -> str | None:
        flag = self.metadata.get("flag")
        return flag_name(self.name) if flag is True else flag or None

    @property
    def range(self) -> Range | None:
        return self.metadata.get("range")


@functools.cache
def declarations(cls: type) -> dict[str, Declared]:
    """Every field of dataclass `cls`, by name, with what `option` declared for it anywhere in its class hierarchy."""
    hints = typing.get_type_hints(cls)
    declared = {}
    for item in dataclasses.fields(cls):
        metadata = next((vars(klass)["__dataclass_fields__"][item.name].metadata for klass in cls.__mro__
                         if item.name in vars(klass).get("__dataclass_fields__", {})
                         and vars(klass)["__dataclass_fields__"][item.name].metadata), {})
        default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
        declared[item.name] = Declared(item.name, hints[item.name], default, metadata)
    return declared


def check_declared(values: Mapping[str, Any], cls: type, spelled: Callable[[str], str] = flag_name) -> dict:
    """`values` for fields of dataclass `cls`, each checked against its declared type and range; one ReslabError
    line naming the field as `spelled` writes it. Ints given for float fields come back as floats."""
    fields = declarations(cls)
    checked = {name: check_field_type(spelled(name), value, fields[name].annotation) if name in fields else value
               for name, value in values.items()}
    for name, value in checked.items():
        if name in fields and fields[name].range is not None:
            check_number(name, value, fields[name].range, spelled(name))
    return checked


def check_field_type(label: str, value: Any, annotation: Any) -> Any:
    """`value` checked against a dataclass field's type (int, float, bool, str, dict, list, optional of those).

    An int where a float is wanted is accepted (and returned as a float); anything else that does not match is one
    ReslabError line naming the field (`label`), the type and the value. Ranges (finite, bounds) are `Range`'s job.
    """
    allowed = _allowed_types(annotation)
    if allowed is None:  # an annotation this checker does not model: leave it to the config's own validate()
        return value
    if value is None:
        if type(None) in allowed:
            return value
    elif isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, (int, float)) and float in allowed:
        return float(value)
    elif isinstance(value, tuple(t for t in allowed if t not in (int, float, bool, type(None)))):
        return value
    names = " or ".join(_type_name(t) for t in allowed)
    raise ReslabError(f"{label} must be {names}, got {value!r} ({_type_name(type(value))})")


def _allowed_types(annotation: Any) -> tuple[type, ...] | None:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [_allowed_types(arg) for arg in typing.get_args(annotation)]
        return None if any(p is None for p in parts) else tuple(t for p in parts for t in p)
    if annotation is type(None) or annotation is None:
        return (type(None),)
    base = origin or annotation
    return (base,) if base in (int, float, bool, str, dict, list) else None


def _type_name(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
            list: "a list", type(None): "null"}.get(kind, kind.__name__)


@dataclass(frozen=True)
class OnlyWith:
    """A config field that matters only when another one, `field`, is set: true (non-zero, non-empty), or, when
    `values` are given, one of them. A config declares these (`ONLY_WITH`); a flag given for a field whose condition
    does not hold is refused (`check_applies`) instead of being silently ignored."""

    field: str
    values: tuple[Any, ...] = ()

    def holds(self, settings: Mapping[str, Any]) -> bool:
        current = settings.get(self.field)
        return current in self.values if self.values else bool(current)


def check_applies(given: Iterable[str], settings: Mapping[str, Any], rules: Mapping[str, OnlyWith],
                  spelled: Callable[[str], str] = flag_name) -> None:
    """Raise one ReslabError line for the first setting in `given` that `settings` (the values the config will have)
    makes unused, by `rules`; `spelled(name)` is how the user wrote a setting (its flag)."""
    for name in given:
        rule = rules.get(name)
        if rule is None or rule.holds(settings):
            continue
        need = spelled(rule.field) + (" " + " or ".join(map(str, rule.values)) if rule.values else "")
        raise ReslabError(f"{spelled(name)} applies only with {need} ({spelled(rule.field)} is "
                          f"{settings.get(rule.field)!r} here); give {need}, or drop {spelled(name)}")


def check_positive(**sizes: int | float) -> None:
    """Raise ReslabError for the first size that is not a finite number > 0 (None: not given, passes)."""
    for name, value in sizes.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ReslabError(f"{name} must be positive, got {value!r}")
