"""Reading a JSON file a user can hand reslab: one reader for every format, so every format refuses the same way.

Each file format (a data manifest, a run's config.json, metrics.jsonl, a tokenizer, a design, an expected audit)
reads through `read_json_file` / `parse_json` and declares what it holds as a schema of `Field`s checked by
`check_schema`. A violation is one `ReslabError` line naming the file, the key and the fix:

    data/manifest.json: shards[2].tokens must be an integer >= 1, got "12"; prepare the data again

- Nesting is limited (`MAX_DEPTH`) and measured before parsing, so JSON nested 100,000 deep is refused in one line
  instead of ending in Python's RecursionError.
- A file name read from a file (`confined_path`) stays inside its directory: no absolute path, no `..`, no symlink
  that leads out.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reslab.errors import ReslabError

MAX_DEPTH = 64  # reslab's own files nest at most 6 deep; a design or expected audit a little more
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def nesting_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON `text` (0 for a scalar), without parsing it (no recursion)."""
    import numpy as np  # here, not at the top: `reslab --help` reads no JSON and imports no numpy

    codes = np.frombuffer(_STRING.sub('""', text).encode("utf-8", "surrogatepass"), np.uint8)
    opens = (codes == ord("[")) | (codes == ord("{"))
    closes = (codes == ord("]")) | (codes == ord("}"))
    steps = opens.view(np.int8) - closes.view(np.int8)  # one byte a character
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


_RAISE = object()


def parse_json(text: str, source: str, fix: str, *, max_depth: int = MAX_DEPTH,
               error: type[ReslabError] = ReslabError, allow_nan: bool = False, invalid: Any = _RAISE) -> Any:
    """`text` parsed; a syntax error or nesting deeper than `max_depth` is one `error` line naming `source`.

    NaN and Infinity are refused unless `allow_nan` (files reslab writes itself, where a loss may be NaN). With
    `invalid` given, text that is not JSON returns it instead of raising (for a reader that tolerates a line a crash
    cut off); nesting too deep is raised all the same."""
    if text.count("[") + text.count("{") > max_depth:  # the count bounds the depth: most texts need no scan
        depth = nesting_depth(text)
        if depth > max_depth:
            raise error(f"{source} nests {depth} levels deep, more than the {max_depth} reslab reads; {fix}")
    try:
        return json.loads(text, parse_constant=None if allow_nan else _no_constant)
    except ValueError as err:
        if invalid is not _RAISE:
            return invalid
        raise error(f"{source} is not valid JSON ({err}); {fix}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def read_json_file(path: Path | str, fix: str, *, what: str = "file", max_depth: int = MAX_DEPTH,
                   error: type[ReslabError] = ReslabError, allow_nan: bool = False) -> Any:
    """The JSON value in `path` (UTF-8); a missing, unreadable, binary or malformed file is one `error` line."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a JSON file; {fix}")
    if path.exists() and not path.is_file():  # a FIFO would block the read, a device never end it
        raise error(f"{what} {path} is not a regular file; {fix}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"no {what} {path}; {fix}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"cannot read {what} {path} ({err}); {fix}") from None
    return parse_json(text, str(path), fix, max_depth=max_depth, error=error, allow_nan=allow_nan)


# ------------------------------------------------------------------------------------------------------ schema


@dataclass(frozen=True)
class Field:
    """What one key holds. `kind`: a JSON type (int, float, str, bool, dict, list; float admits int; int refuses
    bool); `minimum` / `maximum` bound numbers (and the length of strings); `choices` lists the allowed values;
    `items` is the schema of each element of a list (a `Field`, or a dict of `Field`s for a list of objects);
    `keys` the schema of an object."""

    kind: type | tuple[type, ...]
    required: bool = True
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    items: Field | Mapping[str, Field] | None = None
    keys: Mapping[str, Field] | None = None


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
          list: "a list"}


def check_schema(value: Any, schema: Mapping[str, Field], source: str, fix: str, *, where: str = "",
                 error: type[ReslabError] = ReslabError) -> None:
    """Raise `error` (one line: source, key, what it must be, what it is, fix) at the first violation."""
    if not isinstance(value, dict):
        raise error(f"{source}: {where or 'the file'} must be an object, got {_shown(value)}; {fix}")
    for key, field in schema.items():
        at = f"{where}.{key}" if where else key
        if key not in value:
            if field.required:
                raise error(f"{source}: {at} is missing; {fix}")
            continue
        check_field(value[key], field, source, fix, where=at, error=error)


def check_field(value: Any, field: Field, source: str, fix: str, *, where: str,
                error: type[ReslabError] = ReslabError) -> None:
    problem = _problem(value, field)
    if problem:
        raise error(f"{source}: {where} must be {problem}, got {_shown(value)}; {fix}")
    if field.keys is not None:
        check_schema(value, field.keys, source, fix, where=where, error=error)
    if field.items is not None:
        for index, item in enumerate(value):
            at = f"{where}[{index}]"
            if isinstance(field.items, Field):
                check_field(item, field.items, source, fix, where=at, error=error)
            else:
                check_schema(item, field.items, source, fix, where=at, error=error)


def _problem(value: Any, field: Field) -> str | None:
    """What `value` must be, when it is not what `field` says; None when it is."""
    kinds = field.kind if isinstance(field.kind, tuple) else (field.kind,)
    if not any(_is(value, kind) for kind in kinds):
        return " or ".join(_NAMES.get(kind, kind.__name__) for kind in kinds)
    if field.choices is not None and value not in field.choices:
        return "one of " + ", ".join(json.dumps(choice) for choice in field.choices)
    size = len(value) if isinstance(value, (str, list)) else value
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        low, high = field.minimum, field.maximum
        if (low is not None and size < low) or (high is not None and size > high):
            noun = "of length " if isinstance(value, (str, list)) else ""
            return f"{_NAMES[kinds[0]]} {noun}{_bounds(low, high)}"
    return None


def finite_number(value: Any) -> bool:
    """An int or float, not a bool, and finite (an integer too large for a float is not): a number a record can
    be computed with."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return finite_number(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _bounds(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"in [{low:g}, {high:g}]"
    return f">= {low:g}" if low is not None else f"<= {high:g}"


def _shown(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------------------------- paths


def confined_path(directory: Path | str, name: Any, source: str, key: str, fix: str,
                  error: type[ReslabError] = ReslabError) -> Path:
    """`directory / name` for a file name read from a file, refused unless it stays inside `directory`:
    a plain relative name, no `..`, not absolute, and no symlink on the way that leads out."""
    directory = Path(directory)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise error(f"{source}: {key} must be a file name, got {_shown(name)}; {fix}")
    parts = Path(name).parts
    if os.path.isabs(name) or ".." in parts or name.startswith("~"):
        raise error(f"{source}: {key} is {name!r}, which leads outside {directory}; file names in it must be "
                    f"relative and inside its directory; {fix}")
    path = directory / name
    try:
        root = directory.resolve()
        target = path.resolve() if path.is_symlink() or path.exists() else None
    except (RuntimeError, OSError) as err:  # a symlink loop (RuntimeError before Python 3.13, OSError after)
        raise error(f"{source}: {key} {name!r} is a symlink loop ({err}); {fix}") from None
    if target is not None and target != root and root not in target.parents:
        raise error(f"{source}: {key} {name!r} is a symlink to {target}, outside {directory}; {fix}")
    return path
