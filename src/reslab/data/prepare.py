"""Tokenize a corpus once into shards on disk: streamed, in parallel, atomic per shard, resumable.

    manifest = prepare_data(["corpus/"], Path("data/corpus-char"), PrepareOptions(tokenizer="char", workers=2))

The text is read in chunks cut at safe newlines (`reslab.data.sources`), encoded by `workers` processes, and
gathered in order into shards of about `shard_tokens` tokens (uint16 when the vocabulary fits, else uint32). Each
shard is written atomically with its sha256; after each one `prepare-state.json` records where the input stands, so
an interrupted prepare continues from its last shard (the shards on disk are checked first). `manifest.json` is
written last: a directory with a manifest is complete.

Split: the first `train_fraction` (default 0.9) of the stream's tokens train, the rest validate: the rule
`split_tokens` applies to a corpus in memory, so a prepared text gives the same two splits.

The char tokenizer on text files takes `reslab.data.charprep` instead (workers read their own byte ranges; the same
shards, several times faster); other tokenizers and Hugging Face datasets take the general path below.

`cached_text(path, kind, vocab_size)` is what `--data FILE.txt` uses: the file prepared into the cache folder,
keyed by the sha256 of its text and the tokenizer, so a second run (or every point of an ablation) starts at once.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import hashlib
import itertools
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reslab.data import charprep
from reslab.data.sources import default_cache_dir
from reslab.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PREPARE_STATE,
    SHARD_SCHEMA,
    dtype_for,
    file_sha256,
    fingerprint,
    read_manifest,
    shard_name,
)
from reslab.data.sources import CHUNK_BYTES, Chunk, check_text_file, content_sha256, resolve_sources, text_chunks
from reslab.data.tokenizer import (
    DEFAULT_BPE_VOCAB,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    check_bpe_vocab,
    load_tokenizer_file,
)
from reslab.data.tokenizer import FILENAME as TOKENIZER_FILE
from reslab.errors import Interrupted, ReslabError
from reslab.io import (
    Field, atomic_write, check_schema, read_json_file, remove_temp_files, write_json,
)

STATE = PREPARE_STATE
STATE_SCHEMA = {"job": Field(dict), "shards": Field(list, items=SHARD_SCHEMA),
                "position": Field(list, minimum=3, maximum=3, items=Field(int, minimum=0)),
                "characters": Field(int, minimum=0), "text_seen": Field(bool)}
DEFAULT_SHARD_TOKENS = 1 << 24  # 32 MiB of uint16 per shard: the most a prepare holds in memory
PARALLEL_BYTES = 16 << 20  # one worker process per this much text, at most --workers (a worker costs ~1 s to start)


@dataclass
class PrepareOptions:
    tokenizer: str = "char"  # "char", "bpe" (trained on the first bpe_sample_bytes), "gpt2" or a tokenizer file
    vocab_size: int | None = None  # BPE only
    workers: int = 1
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    val_fraction: float = 0.1
    bpe_sample_bytes: int | None = None  # None: train BPE on all the text
    chunk_bytes: int = CHUNK_BYTES
    progress: bool = False
    flag: str = "SOURCE"  # how errors name the input

    def job(self) -> dict[str, Any]:
        """What decides the shards' bytes; an interrupted prepare continues only under the same job."""
        record = asdict(self)
        for runtime in ("workers", "progress", "flag"):
            record.pop(runtime)
        return record


def prepare_data(sources: list, out: Path, options: PrepareOptions, identity: list | None = None) -> dict[str, Any]:
    """Prepare `sources` (files, globs, directories) into `out`; returns the manifest. Resumes an interrupted run.

    identity: how the job names its input (default: each file's path, size and mtime; the cache uses the text's
    sha256, so the same text under another name is the same job).
    """
    files = resolve_sources([str(s) for s in sources])
    _check_options(options)
    out = Path(out)
    job = {**options.job(), "sources": identity or [_identity(f) for f in files]}
    with _writing_into(out):
        try:
            return _prepare_locked(files, out, options, job)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; the shards already written to {out} (if any) are kept: run the same "
                              "command again to continue") from None


def _prepare_locked(files: list, out: Path, options: PrepareOptions, job: dict[str, Any]) -> dict[str, Any]:
    done = _finished(out, job)
    if done is not None:
        return done
    if options.tokenizer == "char" and all(isinstance(f, Path) for f in files):
        return _prepare_chars(files, out, options, job)
    state = _resume_state(out, job)
    if state is None:
        tokenizer = _build_tokenizer(files, options)
        state = {"job": job, "shards": [], "position": [0, 0, 0], "characters": 0, "text_seen": False}
        write_json(out / STATE, state)  # first: a directory with a state file is an unfinished prepare of this job
        atomic_write(out / TOKENIZER_FILE, tokenizer.to_bytes())
    else:
        tokenizer = load_tokenizer_file(out / TOKENIZER_FILE)
    _encode_all(files, out, tokenizer, options, state)
    return _write_manifest(out, tokenizer, options, state, files)


def _identity(source) -> list:
    """A file by its path, size and mtime; a dataset by its spec, rows and fingerprint."""
    if not isinstance(source, Path):
        return source.identity()
    info = source.stat()
    return [str(source.resolve()), info.st_size, info.st_mtime_ns]


def _chunks(source, offset: int, options: PrepareOptions) -> Iterator[Chunk]:
    if not isinstance(source, Path):
        return source.chunks(offset, options.chunk_bytes)
    return text_chunks(source, offset, options.chunk_bytes, options.flag)


def _extent(source) -> tuple[int, int]:
    """(weight in bytes, units a position counts in) of a source: bytes for a file, rows for a dataset."""
    if not isinstance(source, Path):
        return source.nbytes, source.rows
    size = source.stat().st_size
    return size, size


def bpe_vocab(options: PrepareOptions) -> int:
    """The BPE vocabulary asked for: the default only when none was given (a 0 given is refused, not replaced)."""
    return DEFAULT_BPE_VOCAB if options.vocab_size is None else options.vocab_size


def _check_options(options: PrepareOptions) -> None:
    if not 0.0 < options.val_fraction < 1.0:
        raise ReslabError(f"--val-fraction must be between 0 and 1 (exclusive), got {options.val_fraction}")
    for name in ("workers", "shard_tokens", "chunk_bytes"):
        if not isinstance(getattr(options, name), int) or getattr(options, name) < 1:
            raise ReslabError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(options, name)!r}")
    if options.tokenizer == "bpe":
        check_bpe_vocab(bpe_vocab(options))


@contextlib.contextmanager
def _writing_into(out: Path):
    """--out for this prepare alone: created if missing, then held with an exclusive lock (flock on the directory
    itself: nothing is added to it, and the OS lets go when the holder dies, kill -9 included). A second prepare into
    the same --out is refused at once: two of them would write each other's shards under one manifest. A directory
    this prepare created and left empty (it was refused, say) is removed again."""
    created = not out.exists() and not out.is_symlink()
    if created:
        out.mkdir(parents=True, exist_ok=True)
    if not out.is_dir():
        raise ReslabError(f"--out {out} is a file (or a symlink to no directory); give a directory")
    descriptor = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ReslabError(f"--out {out} is being written by another reslab data prepare right now; wait for it "
                              "to end (then run this command again: a finished prepare is kept) or choose another "
                              "--out") from None
        try:
            yield
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only an empty directory: never one with a shard in it
            raise
    finally:
        os.close(descriptor)  # and the lock with it


_OWN = "|".join(re.escape(name) for name in (TOKENIZER_FILE, STATE, MANIFEST))
PREPARE_NAMES = re.compile(rf"shard-\d{{5,}}\.bin|{_OWN}|\.(shard-\d{{5,}}\.bin|{_OWN})\..+\.tmp")


def _foreign(out: Path) -> str | None:
    """The first entry of --out that a prepare does not write (its shards, tokenizer, state and their temp files)."""
    return next((p.name for p in sorted(out.iterdir()) if not PREPARE_NAMES.fullmatch(p.name)), None)


def _finished(out: Path, job: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a finished prepare of the same job; a different one, or a foreign directory, is refused."""
    if (out / MANIFEST).exists():
        try:
            manifest = read_manifest(out)
        except ReslabError as err:
            raise ReslabError(f"{err} (delete {out} first, or choose another --out)") from None
        if manifest.get("job") != job:
            raise ReslabError(f"--out {out} already holds data prepared from other sources or options; choose "
                              "another --out (nothing was changed)")
        return manifest
    if out.is_file():
        raise ReslabError(f"--out {out} is a file; give a directory")
    if out.is_dir() and not (out / STATE).exists() and any(out.iterdir()):
        raise ReslabError(f"--out {out} is not empty and holds no prepared data; choose another --out")
    return None


def _resume_state(out: Path, job: dict[str, Any]) -> dict[str, Any] | None:
    """The state of an interrupted prepare of this job, with its shards checked; None to start afresh."""
    if not (out / STATE).exists():
        return None
    refusal = (f"delete {out} if it is an interrupted prepare of yours, or choose another --out (nothing was "
               "changed)")
    try:  # reslab writes it atomically: damaged means edited, or not reslab's; its directory is not rewritten
        state = read_json_file(out / STATE, refusal, what="prepare state")
        check_schema(state, STATE_SCHEMA, str(out / STATE), refusal)
    except ReslabError as err:
        raise ReslabError(f"--out holds a prepare state that reslab cannot use: {err}") from None
    if [entry["name"] for entry in state["shards"]] != list(map(shard_name, range(len(state["shards"])))):
        raise ReslabError(f"{out / STATE} lists shard names reslab does not write; {refusal}")
    if state.get("job") != job:
        raise ReslabError(f"--out {out} holds an interrupted prepare of other sources or options; run that one "
                          "again, or choose another --out")
    if not (out / TOKENIZER_FILE).exists():  # killed between the state and the tokenizer: start again, if only
        foreign = _foreign(out)              # reslab's files are there to be rewritten
        if foreign is not None:
            raise ReslabError(f"--out {out} holds {foreign!r}, which reslab did not write, beside an interrupted "
                              f"prepare; {refusal}")
        return None
    remove_temp_files(out, tuple(shard_name(i) for i in range(len(state["shards"]) + 1)) + (MANIFEST, STATE))
    for entry in state["shards"]:
        path = out / entry["name"]
        if not path.is_file() or file_sha256(path) != entry["sha256"]:
            raise ReslabError(f"{path} no longer matches its checksum; delete {out} and prepare again")
    return state


# ------------------------------------------------------------------------------------------- the tokenizer


def _corpus(files: list, options: PrepareOptions, start: tuple[int, int] = (0, 0)) -> Iterator[tuple]:
    """(file index, chunk) over every file from `start`, in order."""
    for index in range(start[0], len(files)):
        offset = start[1] if index == start[0] else 0
        for chunk in _chunks(files[index], offset, options):
            yield index, chunk


def _build_tokenizer(files: list, options: PrepareOptions) -> Tokenizer:
    """char: the set of every character (one streamed pass); bpe: trained on the first bpe_sample_bytes; else a file."""
    if options.tokenizer == "char":
        chars: set[str] = set()
        for _, chunk in _corpus(files, options):
            chars.update(chunk.text)
        _check_not_blank(chars, files, options)
        return CharTokenizer("".join(sorted(chars)))
    if options.tokenizer == "bpe":
        return BPETokenizer.train_from_lines(_sample_lines(files, options), bpe_vocab(options))
    path = gpt2_tokenizer_file() if options.tokenizer == "gpt2" else Path(options.tokenizer).expanduser()
    if not path.is_file():
        raise ReslabError(f"--tokenizer {options.tokenizer}: not char, bpe, gpt2 or a tokenizer.json file")
    return load_tokenizer_file(path)


def gpt2_tokenizer_file() -> Path:
    """GPT-2's tokenizer.json from the local Hugging Face cache; nothing is downloaded."""
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" /
                                                                     "huggingface")) / "hub")
    for repo in ("models--openai-community--gpt2", "models--gpt2"):
        found = sorted((hub / repo / "snapshots").glob("*/tokenizer.json"))
        if found:
            return found[-1]
    raise ReslabError(f"--tokenizer gpt2: GPT-2's tokenizer.json is not on this machine (looked in {hub}); "
                      "download it once and pass --tokenizer PATH/tokenizer.json")


def _sample_lines(files: list, options: PrepareOptions) -> Iterator[str]:
    """The lines of the first bpe_sample_bytes of text (all of it by default), streamed."""
    taken, seen = 0, set()
    for _, chunk in _corpus(files, options):
        if not seen and chunk.text.strip():
            seen.add("x")
        yield from chunk.text.splitlines(keepends=True)
        taken += len(chunk.text.encode("utf-8"))
        if options.bpe_sample_bytes is not None and taken >= options.bpe_sample_bytes:
            break
    _check_not_blank(seen, files, options)


def _check_not_blank(seen: set[str], files: list, options: PrepareOptions) -> None:
    if not any(not c.isspace() for c in seen):
        raise ReslabError(f"{options.flag} {files[0]} is empty; pass a file with text in it")


# ---------------------------------------------------------------------------------- char on files: charprep


def _prepare_chars(files: list[Path], out: Path, options: PrepareOptions, job: dict[str, Any]) -> dict[str, Any]:
    """The char tokenizer on text files (`reslab.data.charprep`): scan, then encode shard by shard, in workers."""
    state = _resume_state(out, job)
    found = charprep.blocks(files)
    workers = charprep.Workers(min(options.workers, max(1, sum(b[3] for b in found) // PARALLEL_BYTES)))
    try:
        scans = _scanned(workers, found, files, options)
        chars = sorted(set().union(*(scan[2] for scan in scans)))
        _check_not_blank(set(chars), files, options)
        tokenizer = CharTokenizer("".join(chars))
        if state is None:
            state = {"job": job, "shards": [], "position": [0, 0, 0], "characters": 0, "text_seen": True}
            write_json(out / STATE, state)
            atomic_write(out / TOKENIZER_FILE, tokenizer.to_bytes())
        elif (out / TOKENIZER_FILE).read_bytes() != tokenizer.to_bytes():
            raise ReslabError(f"{options.flag} {files[0]} changed since this prepare began; delete {out} and "
                              "prepare again")
        state["characters"] = sum(scan[0] for scan in scans)
        plans = charprep.shard_plans(found, scans, options.shard_tokens)
        first = len(state["shards"])
        remove_temp_files(out, tuple(map(shard_name, range(first, len(plans)))))  # workers killed while writing
        entries = workers.map(charprep.encode_shard, itertools.repeat(str(out)), range(first, len(plans)),
                              plans[first:], itertools.repeat(tokenizer.chars),
                              itertools.repeat(dtype_for(tokenizer.vocab_size)))
        _record_shards(entries, plans[first:], state, out, _Progress(files, state, options.progress, "encode"))
    finally:
        workers.close()
    return _write_manifest(out, tokenizer, options, state, files)


def _record_shards(entries: Iterator[dict], plans: list, state: dict[str, Any], out: Path, progress) -> None:
    """Each shard's entry into the state as it finishes, in order (a resumed prepare keeps them)."""
    paths = {str(path): index for index, path in enumerate(progress.files)}
    try:
        for plan, entry in zip(plans, entries):
            state["shards"].append(entry)
            write_json(out / STATE, state)
            path, offset, length = plan[-1][:3]
            progress.update(paths[path], offset + length, entry["tokens"])
    finally:
        progress.close()


def _scanned(workers: charprep.Workers, found: list, files: list[Path], options: PrepareOptions) -> list[tuple]:
    """Every block's scan, in order, with a progress line."""
    progress, scans = _Progress(files, {"position": [0, 0, 0]}, options.progress, "scan"), []
    try:
        for block, scan in zip(found, workers.map(functools.partial(charprep.scan, flag=options.flag), found)):
            scans.append(scan)
            progress.update(block[0], block[2] + block[3], scan[0])
    finally:
        progress.close()
    return scans


# ------------------------------------------------------------------------------------------------ encoding

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_bytes: bytes) -> None:
    global _worker_tokenizer
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / TOKENIZER_FILE).write_bytes(tokenizer_bytes)
        _worker_tokenizer = load_tokenizer_file(Path(folder) / TOKENIZER_FILE)


def _encode(text: str, dtype: str) -> np.ndarray:
    return _worker_tokenizer.encode_array(text).astype(dtype)


class _Encoder:
    """Chunks in, token arrays out in the same order: in this process, or `workers` processes with a bounded queue.
    A worker that dies is one line (`charprep.worker_deaths`); the shards written before it are kept for a re-run."""

    def __init__(self, tokenizer: Tokenizer, workers: int, dtype: str):
        self.dtype, self.limit = dtype, 2 * workers
        # spawned processes (fork after threads, torch's or HF's, can deadlock), each loading the tokenizer once
        self.workers = charprep.Workers(workers, _init_worker, (tokenizer.to_bytes(),))

    def map(self, items: Iterator[tuple]) -> Iterator[tuple]:
        """(item, tokens) for each (file index, chunk) item, in order."""
        pool = self.workers.pool
        if pool is None:
            for item in items:
                yield item, _encode(item[1].text, self.dtype)
            return
        pending: collections.deque = collections.deque()
        with charprep.worker_deaths():
            for item in items:
                pending.append((item, pool.submit(_encode, item[1].text, self.dtype)))
                item[1].text = ""  # the worker has its copy
                if len(pending) >= self.limit:
                    done, result = pending.popleft()
                    yield done, result.result()
            while pending:
                done, result = pending.popleft()
                yield done, result.result()

    def close(self) -> None:
        self.workers.close()


def _encode_all(files: list, out: Path, tokenizer: Tokenizer, options: PrepareOptions,
                state: dict[str, Any]) -> None:
    progress = _Progress(files, state, options.progress)
    workers = min(options.workers, max(1, sum(progress.weights) // PARALLEL_BYTES))  # a worker costs a second to start
    encoder = _Encoder(tokenizer, workers, dtype_for(tokenizer.vocab_size))
    writer = _ShardWriter(out, state, options.shard_tokens)
    index, offset, skip = state["position"]
    try:
        for (index, chunk), tokens in encoder.map(_counted(_corpus(files, options, (index, offset)), state)):
            drop = min(skip, len(tokens))  # written before an interruption, in the shards already on disk
            skip -= drop
            writer.add(index, chunk, tokens[drop:], drop)
            progress.update(index, chunk.end, len(tokens))
        writer.flush([len(files), 0, 0])
    finally:
        encoder.close()
        progress.close()
    if not state["text_seen"]:
        raise ReslabError(f"{options.flag} {files[0]} is empty; pass a file with text in it")


def _counted(items: Iterator[tuple], state: dict[str, Any]) -> Iterator[tuple]:
    """Count characters and notice text that is not all whitespace, as chunks pass (into `state`)."""
    for item in items:
        text = item[1].text
        item[1].characters = len(text)
        if not state["text_seen"] and text.strip():
            state["text_seen"] = True
        yield item


class _ShardWriter:
    """Cuts the token stream into shards of exactly `size` tokens (the last one shorter). After each shard the
    state records where the input stands: [file index, byte offset of a chunk, tokens of it already written]."""

    def __init__(self, out: Path, state: dict[str, Any], size: int):
        self.out, self.state, self.size = out, state, size
        self.parts: list[np.ndarray] = []
        self.count = 0
        self.characters = state["characters"]  # of the chunks written or buffered whole

    def add(self, index: int, chunk: Chunk, tokens: np.ndarray, written: int) -> None:
        used = 0
        while self.count + len(tokens) - used >= self.size:
            take = self.size - self.count
            self.parts.append(tokens[used:used + take])
            used, self.count = used + take, self.size
            if used == len(tokens):
                self.characters += chunk.characters
                self.flush([index, chunk.end, 0])
                return
            self.flush([index, chunk.start, written + used])
        if used < len(tokens):
            self.parts.append(tokens[used:])
            self.count += len(tokens) - used
        self.characters += chunk.characters

    def flush(self, position: list[int]) -> None:
        """Write one shard atomically, then the state that says it is done (a kill between the two redoes it)."""
        self.state["position"] = position
        self.state["characters"] = self.characters
        if not self.parts:
            return
        tokens = np.concatenate(self.parts)
        self.parts, self.count = [], 0
        name = shard_name(len(self.state["shards"]))
        data = tokens.tobytes()
        atomic_write(self.out / name, data)
        self.state["shards"].append({"name": name, "tokens": len(tokens), "sha256": hashlib.sha256(data).hexdigest(),
                                     "max_id": int(tokens.max())})
        write_json(self.out / STATE, self.state)


def _write_manifest(out: Path, tokenizer: Tokenizer, options: PrepareOptions, state: dict[str, Any],
                    files: list) -> dict[str, Any]:
    total = sum(entry["tokens"] for entry in state["shards"])
    train_fraction = 1.0 - options.val_fraction
    train_tokens = int(total * train_fraction)
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "tokenizer": {"kind": tokenizer.kind, "file": TOKENIZER_FILE,
                      "sha256": file_sha256(out / TOKENIZER_FILE)},  # the file's bytes: what a run loads
        "dtype": dtype_for(tokenizer.vocab_size), "vocab_size": tokenizer.vocab_size,
        "tokens": total, "characters": state["characters"],
        "split": {"train_fraction": train_fraction, "train_tokens": train_tokens, "val_tokens": total - train_tokens,
                  "rule": "the first train_tokens tokens of the stream (shards in order) train, the rest validate"},
        "shards": state["shards"],
        "sources": [{"path": str(f), "bytes": _extent(f)[0]} for f in files],
        "job": state["job"],
    }
    manifest["fingerprint"] = fingerprint(manifest)
    write_json(out / MANIFEST, manifest)
    (out / STATE).unlink(missing_ok=True)
    return manifest


class _Progress:
    """One line on stderr, redrawn at most twice a second: bytes read, tokens/s, ETA."""

    def __init__(self, files: list, state: dict[str, Any], enabled: bool, label: str = "prepare"):
        self.enabled, self.label, self.files = enabled, label, files
        self.weights, self.units = zip(*map(_extent, files)) if files else ((), ())
        self.started = self.last = time.monotonic()  # first drawn after half a second: a quick prepare is silent
        self.tokens, self.drawn = 0, False
        self.first = self.done(*state["position"][:2])

    def done(self, index: int, end: int) -> float:
        """Bytes read so far (a dataset's rows counted as their share of its bytes)."""
        partial = self.weights[index] * end / max(self.units[index], 1) if index < len(self.weights) else 0
        return sum(self.weights[:index]) + partial

    def update(self, index: int, end: int, tokens: int) -> None:
        self.tokens += tokens
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.5:
            return
        self.last, elapsed, self.drawn = now, max(now - self.started, 1e-9), True
        done, total = self.done(index, end), sum(self.weights)
        rate = (done - self.first) / elapsed
        eta = (total - done) / rate if rate > 0 else float("inf")
        sys.stderr.write(f"\r{self.label}: {done / 2**20:,.0f}/{total / 2**20:,.0f} MiB  "
                         f"{self.tokens / elapsed:,.0f} tokens/s  ETA {eta:,.0f} s   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            self.drawn = False


# --------------------------------------------------------------------------------------------------- cache


def cached_text(path: Path, kind: str, vocab_size: int | None, expect_sha256: str | None = None) -> tuple[Path, str]:
    """(prepared directory, sha256 of the text) for a text file, prepared into the cache on first use.

    Keyed by the text's sha256 and the tokenizer; a lock makes concurrent runs (an ablation's points) prepare it
    once. expect_sha256: a resumed run's record; a changed file is refused before anything is prepared.
    """
    path = Path(path)
    check_text_file(path)
    sha = content_sha256(path)
    if expect_sha256 is not None and sha != expect_sha256:
        raise ReslabError(f"the data {str(path)!r} changed since the run started; resume with the same text or "
                          "start a new run")
    key = f"{sha[:32]}-{kind}{vocab_size if kind == 'bpe' else ''}"
    out = default_cache_dir() / "tokens" / key
    size = path.stat().st_size
    options = PrepareOptions(tokenizer=kind, vocab_size=vocab_size, flag="--data", workers=os.cpu_count() or 1,
                             progress=size > PARALLEL_BYTES and sys.stderr.isatty())
    try:
        with _locked(out.with_name(key + ".lock")):
            prepare_data([path], out, options, identity=[sha])
    except OSError as err:
        raise ReslabError(f"cannot write the token cache {out} ({err.strerror or err}); set RESLAB_CACHE to a "
                          "writable folder") from err
    return out, sha


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, or by the OS if we die
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def describe(manifest: dict[str, Any]) -> str:
    validation = manifest["tokens"] - manifest["split"]["train_tokens"]
    return (f"{manifest['tokens']:,} tokens in {len(manifest['shards'])} shard(s), {manifest['dtype']}, "
            f"vocabulary {manifest['vocab_size']}, {validation:,} validation")

