"""reslab's files on disk, written and read one way everywhere.

- **Writes are crash-safe** (`atomic_write`, `write_json`): a reader (or a resumed run) sees the old file or the whole
  new one, never a part.
- **JSON is read by one reader** (`read_json_file`, `parse_json`, `check_schema`): every format refuses the same
  way.
- **Failpoints** (`failpoint`) mark the places where the fault-injection tests make a real crash happen.
- `command_line` is the one way reslab prints a command for the user to paste: shell-quoted, on one line.

## Reading JSON

Each file format (a data manifest, a run's config.json, metrics.jsonl, a tokenizer, a design, an expected audit)
reads through `read_json_file` / `parse_json` and declares what it holds as a schema of `Field`s checked by
`check_schema`. A violation is one `ReslabError` line naming the file, the key and the fix:

    data/manifest.json: shards[2].tokens must be an integer >= 1, got "12"; prepare the data again

- Nesting is limited (`MAX_DEPTH`) and measured before parsing, so JSON nested 100,000 deep is refused in one line
  instead of ending in Python's RecursionError.
- A file name read from a file (`confined_path`) stays inside its directory: no absolute path, no `..`, no symlink
  that leads out.

## Failpoints

Named places where the fault-injection tests make a real fault happen, deterministically. Off unless the
environment sets `RESLAB_FAILPOINTS`, a comma list of `NAME[@N]=ACTION`: the N-th time (default the first) the code
passes failpoint NAME, ACTION happens there:

    kill    SIGKILL this process (nothing runs after it: no handler, no cleanup; as `kill -9`)
    sigint  send this process SIGINT (as Ctrl-C in its terminal)
    stop    SIGSTOP this process (as Ctrl-Z): a test then sends what it wants and SIGCONT, at a known moment
    enospc  raise OSError(ENOSPC) (as a full disk)

Names: `write:FILE` (inside an atomic write of FILE: the temp file is written, not yet renamed), `append:FILE`
(a whole line appended, then cut to its first half, as a crash in its write leaves it), `step` (inside a step: after
backward, before the optimizer update), `eval` (inside an evaluation), `checkpoint` (before a checkpoint is
written). N counts passes in this process, not training steps:
`step@7=kill` kills the 7th step this process runs (step 7 of a fresh run; a resumed run counts from its restart).

    RESLAB_FAILPOINTS="write:checkpoint.safetensors@2=kill" reslab train ...
    RESLAB_FAILPOINTS="step@2=kill" reslab train --resume RUN

This is how the suite lands inside a write or an evaluation every time, instead of hoping a sleep does.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shlex
import signal
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reslab.errors import ReslabError

_hits: Counter[str] = Counter()


def _armed() -> dict[str, tuple[int, str]]:
    armed = {}
    for item in filter(None, (part.strip() for part in os.environ.get("RESLAB_FAILPOINTS", "").split(","))):
        name, _, action = item.rpartition("=")
        name, _, count = name.partition("@")
        armed[name] = (int(count or 1), action)
    return armed


def failpoint(name: str, before: Callable[[], None] | None = None) -> None:
    """Make the armed fault happen if this is its moment; a no-op (one dict lookup) when nothing is armed.
    `before` runs first, only then: it leaves the state the fault should find (e.g. half of a line written)."""
    if "RESLAB_FAILPOINTS" not in os.environ:
        return
    armed = _armed().get(name)
    if armed is None:
        return
    _hits[name] += 1
    if _hits[name] != armed[0]:
        return
    action = armed[1]
    if before is not None:
        before()
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "sigint":
        os.kill(os.getpid(), signal.SIGINT)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as the OS raises it from a write: no file name
    else:
        raise ValueError(f"RESLAB_FAILPOINTS: unknown action {action!r} for {name!r}")


TEMP_SUFFIX = ".tmp"


def temp_prefix(name: str) -> str:
    """Temp files of `atomic_write` are `.NAME.<random>.tmp` beside NAME: hidden, and findable to clean up."""
    return f".{name}."


def atomic_write(path: Path, data: bytes | Callable[[Path], None]) -> None:
    """Write bytes (or let `data(tmp_path)` write a file) to a temp file beside `path`, fsync, rename into place.

    The rename is atomic on POSIX, and the directory is fsynced after it, so killing the process at any moment
    leaves either the previous file or the new one (and at worst a stray temp file, which `remove_temp_files`
    clears). If the write fails (a full disk, an interrupt), the temp file is removed and the original error is
    raised unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=TEMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
            if not callable(data):
                _write_all(fd, data)
        finally:
            os.close(fd)  # exactly once, whatever happened above
        if callable(data):
            data(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # a writer that recreated the file: the mode open() would give
        failpoint(f"write:{path.name}")
        _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.filename in (None, str(tmp), tmp):  # name the file being written, not its temp file
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temp_files(directory: Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temp files that a killed `atomic_write` of any of `names` left in `directory`; returns them."""
    removed = []
    for name in names:
        for stray in Path(directory).glob(f"{temp_prefix(name)}*{TEMP_SUFFIX}"):
            stray.unlink(missing_ok=True)
            removed.append(stray)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def command_line(*words: Any) -> str:
    """`words` (strings, paths) as one shell command line that a user can paste: each word quoted so that a shell
    runs nothing in it (`$(...)`, backticks, globs). A word with characters that do not print (a newline, a tab, a
    byte that is not UTF-8) becomes a `$'...'` word (bash, zsh, ksh) with those characters escaped, so the command
    stays on one line and names exactly that word."""
    return " ".join(_shell_word(str(word)) for word in words)


def _shell_word(word: str) -> str:
    if word.isprintable():
        return shlex.quote(word)
    return "$'" + "".join(_escaped(char) for char in word) + "'"


_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escaped(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable():
        return char
    if "\udc80" <= char <= "\udcff":  # a byte that is not UTF-8, as Python decodes a file name (surrogateescape)
        return f"\\x{ord(char) - 0xDC00:02x}"
    return "".join(f"\\x{byte:02x}" for byte in char.encode("utf-8", "surrogatepass"))


def write_json(path: Path, value: Any) -> None:
    atomic_write(path, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode())


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
