"""The run directory: the names of its files, and the one place that decides what is reslab's in it.

    runs/gpt-pre/
        .reslab-run              the marker: written first, only by reslab; "this directory is a reslab run"
        .reslab-lock             held (flock) by the process training the run; names its pid
        config.json              model + training config, data fingerprint, command
        tokenizer.reslab.json    the tokenizer, in reslab's format (runs written before: tokenizer.json)
        metrics.jsonl            one JSON record per logged step
        checkpoint.safetensors   weights, optimizer moments, RNG states (+ the training state in its metadata)
        state.json               a readable copy of that training state
        summary.json             written at the end
        diverged.json            written instead when the loss became non-finite (ablations)
        tensorboard/             event files, when tensorboard is installed

Only these names are ever removed (by `--overwrite`); anything else a user put in the directory stays.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reslab.errors import ReslabError
from reslab.io import (
    TEMP_SUFFIX, atomic_write, command_line, failpoint, parse_json, read_json_file, remove_temp_files, temp_prefix,
    write_json,
)
from reslab.metrics import METRICS as DECLARED_METRICS

MARKER = ".reslab-run"
LOCK = ".reslab-lock"
CONFIG = "config.json"
TOKENIZER = "tokenizer.reslab.json"  # reslab's format; tokenizer.json is Hugging Face's name (reslab export)
OLD_TOKENIZER = "tokenizer.json"  # the name runs written before had: still read
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.safetensors"
STATE = "state.json"
SUMMARY = "summary.json"
DIVERGED = "diverged.json"
TENSORBOARD = "tensorboard"
OWN_FILES = (CONFIG, TOKENIZER, METRICS, CHECKPOINT, STATE, SUMMARY, DIVERGED)
CONFIG_KEYS = ("model", "model_config", "train", "data")


# The schema of one metrics.jsonl record: every key the trainer may write, and what it holds, from the declarations
# in `reslab.metrics`; tests/test_rundir_schema.py checks that training writes nothing outside it.
METRIC_KEYS: dict[str, str] = {metric.name: metric.description for metric in DECLARED_METRICS.values()}
TIMING_KEYS = tuple(metric.name for metric in DECLARED_METRICS.values() if metric.timing)
_NOT_JSON = object()  # a metrics line that does not parse
_PEEK_BYTES = 1 << 16  # peek_last_metrics reads this much of a file's end


class DamagedRunError(ReslabError):
    """A file of a run directory is unreadable or not what reslab wrote; the message names the file and the fix."""


class RunDir:
    """One run directory. Nothing here writes unless asked to; `check_new` only looks."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:  # a name with bytes that are not UTF-8 (a surrogate escape) cannot be written by every writer
            str(self.path).encode("utf-8")
        except UnicodeEncodeError:
            raise ReslabError(f"the path {str(self.path)!r} is not valid UTF-8; rename it or choose another") from None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def resume_command(self) -> str:
        """The command that continues this run, quoted for a shell: what reslab prints for the user to paste."""
        return command_line("reslab", "train", "--resume", self.path)

    # -- what is this directory? ----------------------------------------------------------------------------

    def is_reslab_run(self) -> bool:
        """The marker, or (runs written before the marker existed) a config.json that only reslab writes."""
        if (self / MARKER).is_file():
            return True
        try:
            config = _read_json_file(self / CONFIG, "config")
        except (OSError, ReslabError):
            return False
        return isinstance(config, dict) and "reslab_version" in config and all(k in config for k in CONFIG_KEYS)

    def has_checkpoint(self) -> bool:
        return (self / CHECKPOINT).is_file()

    def checkpointed_evidence(self) -> list[str]:
        """The files that show the run has checkpointed (or finished): present, or a link, even if unreadable."""
        return [name for name in (CHECKPOINT, STATE, SUMMARY) if (self / name).exists() or (self / name).is_symlink()]

    def check_new(self, overwrite: bool) -> None:
        """Raise (having written nothing) unless a new run may start here, replacing reslab's files if `overwrite`."""
        path = self.path
        if path.is_symlink() and not path.exists():
            raise ReslabError(f"output path {path} is a dangling symlink or a symlink loop; choose another --out")
        if path.exists() and not path.is_dir():
            raise ReslabError(f"output path {path} is a file, not a directory; choose another --out")
        _check_writable(path)
        if not path.exists() or all(_left_by_reslab(p.name) for p in path.iterdir()):
            return  # empty, or only what a run killed while starting left: its lock and temp files
        if self.is_reslab_run() and not (self / CONFIG).exists():
            return  # stopped before its config was written: nothing in it to keep (the user's files stay anyway)
        if not self.is_reslab_run():
            raise ReslabError(f"output directory {path} is not empty and is not a reslab run directory (no "
                              f"{MARKER} marker); reslab never replaces what it did not write: choose another --out")
        if not overwrite:
            raise ReslabError(f"output directory {path} holds a reslab run; continue it with {self.resume_command()}, "
                              "pass --overwrite to replace it, or choose another --out")

    # -- opening an existing run to continue it ------------------------------------------------------------------

    def resumable_config(self) -> dict[str, Any]:
        """The config of a run `--resume` may continue (its model config is checked by the caller, which knows
        models); one line naming what is wrong otherwise."""
        if not self.path.is_dir():
            raise ReslabError(f"cannot resume: {self.path} is not a directory; give the run directory to continue")
        if (self / CONFIG).exists() and not self.is_reslab_run():
            raise ReslabError(f"cannot resume: {self.path} is not a reslab run directory (no {MARKER} marker and its "
                              "config.json is not reslab's); reslab never writes into what it did not create")
        if not (self / CONFIG).exists():
            if self.is_reslab_run():
                raise ReslabError(f"cannot resume: {self.path} was stopped before its config was written, so there "
                                  "is nothing to continue; run the same command again without --resume")
            raise ReslabError(f"cannot resume: {self.path} has no config.json; is it a reslab run directory?")
        saved = self.read_config()
        data = saved["data"]
        if not isinstance(data, dict) or not isinstance(data.get("sha256"), str):
            raise DamagedRunError(f"{self / CONFIG}: its data record has no sha256; restore the file from a copy")
        return saved

    def check_restartable(self) -> None:
        """No checkpoint: fine if the run was killed before its first one (it starts again from step 0); but a
        checkpoint that is there and unreadable, or a run that has checkpointed before, is damage, never restarted."""
        path = self / CHECKPOINT
        if path.is_symlink() or path.exists():
            raise DamagedRunError(f"{path} is not a readable checkpoint file (a directory or a dangling symlink); "
                                  "restore it from a copy, or start the run again with --overwrite")
        trained = self.checkpointed_evidence()
        if trained:
            raise DamagedRunError(f"{path} is missing, but {self.path} has checkpointed before ({', '.join(trained)}); "
                                  "restore the checkpoint from a copy, or start the run again with --overwrite")

    # -- creating and replacing ------------------------------------------------------------------------------

    def create(self) -> None:
        """Make the directory and its marker (first, so a run killed at any later moment is recognisable)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self / MARKER).is_file():
            from reslab import __version__

            write_json(self / MARKER, {"reslab_version": __version__, "created": time.time()})

    def clear(self) -> None:
        """Remove reslab's own files (for `--overwrite`); the marker, the lock and the user's files stay."""
        self.remove_temp_files()
        if self._old_tokenizer_is_reslabs():
            (self / OLD_TOKENIZER).unlink()
        for name in OWN_FILES:
            (self / name).unlink(missing_ok=True)
        board = self / TENSORBOARD
        if board.is_dir() and not board.is_symlink():  # only reslab's event files; the folder if that empties it
            for events in board.glob("events.out.tfevents.*"):
                events.unlink(missing_ok=True)
            if not any(board.iterdir()):
                board.rmdir()

    def _old_tokenizer_is_reslabs(self) -> bool:
        """A tokenizer.json that an older reslab wrote (its format: an object with `kind`), in a run that has no file
        of the new name: only then is it reslab's to remove; otherwise it is the user's (e.g. a Hugging Face one)."""
        path = self / OLD_TOKENIZER
        if (self / TOKENIZER).exists() or path.is_symlink() or not path.is_file():
            return False
        try:
            return "kind" in json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            return False

    def remove_temp_files(self) -> list[Path]:
        """Temp files a killed write left behind (never read: the real file is the old or the new one)."""
        return remove_temp_files(self.path, (*OWN_FILES, OLD_TOKENIZER, MARKER))

    # -- the lock --------------------------------------------------------------------------------------------

    def locked(self, what: str = "reslab train") -> contextlib.AbstractContextManager[None]:
        """Hold the run's lock (`lock_directory`) for the block: a second process gets one line naming the holder."""
        return lock_directory(self.path, what)

    # -- config ----------------------------------------------------------------------------------------------

    def read_config(self, required: tuple[str, ...] = CONFIG_KEYS) -> dict[str, Any]:
        """config.json, checked to be reslab's: an object with the `required` keys (by default all four a run
        needs to resume; the audit needs only model and model_config)."""
        path = self / CONFIG
        if self.path.exists() and not self.path.is_dir():
            raise ReslabError(f"{self.path} is not a directory; give a reslab run directory")
        if not path.is_file():
            raise ReslabError(f"{self.path} is not a reslab run directory: it has no {CONFIG}")
        config = _read_json_file(path, "config")
        if not isinstance(config, dict) or any(k not in config for k in required):
            raise DamagedRunError(f"{path} is not a reslab run config (an object with {', '.join(required)}); "
                                  "restore it from a copy, or start the run again with --overwrite")
        if not isinstance(config["model_config"], dict) or not isinstance(config.get("train", {}), dict):
            raise DamagedRunError(f"{path}: model_config and train must be objects; restore the file from a copy")
        return config

    def write_config(self, config: dict[str, Any]) -> None:
        write_json(self / CONFIG, config)

    # -- metrics ---------------------------------------------------------------------------------------------

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self / METRICS)

    def truncate_metrics(self, last_step: int) -> None:
        """Keep the records up to `last_step` (the checkpoint a run resumes from), atomically."""
        if not (self / METRICS).exists():
            return
        kept = [r for r in self.read_metrics() if r["step"] <= last_step]
        atomic_write(self / METRICS, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def open_metrics(self) -> MetricsFile:
        return MetricsFile(self / METRICS)

    # -- summary ---------------------------------------------------------------------------------------------

    def read_summary(self) -> dict[str, Any] | None:
        """summary.json, or None when there is none; a damaged one is a DamagedRunError line."""
        summary = self.read_json_file(SUMMARY)
        if summary is not None and not isinstance(summary, dict):
            raise DamagedRunError(f"{self / SUMMARY} is not a reslab summary (a JSON object); delete it to let the "
                                  "run write it again (reslab train --resume)")
        return summary

    def read_json_file(self, name: str) -> Any:
        """One of the run's JSON files, or None when it is not there; invalid JSON is a DamagedRunError line."""
        path = self / name
        return _read_json_file(path, name) if path.is_file() else None

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self / SUMMARY, summary)


class MetricsFile:
    """metrics.jsonl opened for appending: each record one whole line, in one write to the OS."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record) + "\n").encode()
        try:
            written = os.write(self.fd, line)
            while written < len(line):  # a regular file takes the whole line; a signal may still cut a write short
                written += os.write(self.fd, line[written:])
            failpoint(f"append:{self.path.name}", lambda: self._cut_last(len(line)))  # the fault tests' mid-line
        except OSError as error:  # a full disk or a file size limit: name the file
            raise OSError(error.errno, error.strerror, str(self.path)) from None

    def _cut_last(self, length: int) -> None:
        """Keep half of the line just written: what a crash during its write leaves (for a failpoint only)."""
        os.ftruncate(self.fd, os.fstat(self.fd).st_size - length + length // 2)

    def close(self) -> None:
        os.close(self.fd)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, for every reader (resume, summaries, report, reproductions). The one damage
    policy: a last line cut off (what a kill during its write leaves) is dropped; any other line that is not a
    record is a DamagedRunError naming the file and the line. No file: no records."""
    if not path.exists():
        return []
    if not path.is_file():  # a FIFO or a directory: reading it could block or fail
        raise DamagedRunError(f"{path} is not a regular file; move it away and resume again")
    text = path.read_text(errors="replace")
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        record = parse_json(line, f"{path} line {number}", "repair or delete that line", allow_nan=True,
                            error=DamagedRunError, invalid=_NOT_JSON)
        if record is _NOT_JSON:
            if index == len(lines) - 1 and not text.endswith("\n"):  # the write a kill interrupted
                break
            raise DamagedRunError(f"{path} line {number} is not JSON; repair or delete that line")
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise DamagedRunError(f"{path} line {number} is not a metrics record; repair or delete that line")
        records.append(record)
    return records


def peek_last_metrics(path: Path) -> dict[str, Any]:
    """The last whole record of a metrics.jsonl, read from its end (a peek for the display: metrics are read as
    records by `reslab.rundir.read_metrics`); {} when there is none yet or it cannot be read."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - _PEEK_BYTES))
            lines = handle.read().split(b"\n")[:-1]  # what follows the last newline is a record being written
        record = json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else {}


@contextlib.contextmanager
def lock_directory(path: Path, what: str) -> Iterator[None]:
    """Hold an OS advisory lock on a run or ablation directory (its `.reslab-lock`) for the block: a second process
    gets one line naming the holder. The OS releases it when the holder exits, however it exits (kill -9 included),
    so a lock never outlives its process and never needs cleaning up."""
    import fcntl

    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK
    if lock.is_symlink() or (lock.exists() and not lock.is_file()):  # its target would be truncated below
        raise ReslabError(f"{lock} is not reslab's lock file (a link or not a file); move it away and run again")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise ReslabError(f"{path} is in use by {holder}; wait for it to finish or stop it "
                              "(a lock is released when its process ends)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({what})".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _left_by_reslab(name: str) -> bool:
    """The lock, or the temp file of a write of one of reslab's files that a kill interrupted."""
    if name == LOCK:
        return True
    return name.endswith(TEMP_SUFFIX) and any(name.startswith(temp_prefix(own)) for own in (*OWN_FILES, MARKER))


def _read_json_file(path: Path, what: str) -> Any:
    """A JSON file reslab wrote (NaN allowed); invalid, binary or nested too deep: one DamagedRunError line."""
    fix = f"restore the {what} file from a copy, or delete it and run again"
    return read_json_file(path, fix, what=f"{what} file", allow_nan=True, error=DamagedRunError)


def _check_writable(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a writable directory, or nothing can be created there."""
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ReslabError(f"cannot create {path}: {existing} is a file, not a directory; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ReslabError(f"cannot create {path}: {existing} is not writable; choose another --out")
