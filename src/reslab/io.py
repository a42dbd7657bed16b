"""Crash-safe file writes: a reader (or a resumed run) sees the old file or the whole new one, never a part. And the
one way reslab prints a command for the user to paste (`command_line`): shell-quoted, on one line."""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reslab.faults import failpoint

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


