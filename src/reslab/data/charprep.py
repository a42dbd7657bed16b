"""`reslab data prepare --tokenizer char` on text files, at disk speed: workers read their own byte ranges.

The char tokenizer maps each character to one id, so the token stream's shards are known before anything is
encoded: shard k holds characters [k * shard_tokens, (k + 1) * shard_tokens). Two parallel passes, nothing large
ever crosses a process boundary (tasks are (path, offset, length) tuples, results a few numbers):

  1. scan: the files cut into blocks of BLOCK_BYTES (at UTF-8 character starts); a worker reads its block and
     returns its character count and the set of its characters. An all-ASCII block (the common case) costs two
     `bytes` passes in C (`isascii`, `translate` deleting the characters already seen), not a Python loop.
  2. encode: a worker reads the byte ranges of one shard's characters, encodes them (an ASCII range is one
     `bytes.translate`: ASCII characters sort first, so their ids are below 128 whatever else the vocabulary
     holds), writes the shard atomically and returns its sha256 and largest id.

The shards are byte for byte those of the general path (`prepare._encode_all`), which other tokenizers and
Hugging Face datasets take. Resuming keeps the first shards the state lists (the shards finish in order there).
Workers import numpy and reslab's data modules, never torch (start-up in milliseconds, not a second). A worker that
dies (kill -9, the OOM killer) ends the prepare with one line; the same command again resumes it. A prepare that
dies takes its workers with it (`_start_worker`), so nothing writes into --out after it.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from reslab.data.shards import shard_name
from reslab.data.tokenizer import CharTokenizer
from reslab.errors import ReslabError
from reslab.io import atomic_write
from reslab.processes import die_with_parent

BLOCK_BYTES = 8 << 20  # a scan task; also the most an encode task reads at once
SAMPLE = 1 << 16  # a block's characters are first taken from this prefix, then from what is left after deleting them

Block = tuple[int, str, int, int]  # (file index, path, byte offset, byte length)
Piece = tuple[str, int, int, int, int]  # (path, byte offset, byte length, characters to skip, characters to take)


# --------------------------------------------------------------------------------------------------- scanning


def blocks(files: list[Path]) -> list[Block]:
    """Each file's text (after a UTF-8 BOM) in blocks of about BLOCK_BYTES, each starting at a character start."""
    found = []
    for index, path in enumerate(files):
        size = path.stat().st_size
        with open(path, "rb") as handle:
            start = 3 if handle.read(3) == codecs.BOM_UTF8 else 0
            while start < size:
                end = min(start + BLOCK_BYTES, size)
                if end < size:
                    handle.seek(end)
                    head = handle.read(3)  # a continuation byte is 0b10xxxxxx; a character has at most 3 of them
                    # skip the continuation bytes of a character cut by the boundary (all 3 of a 4-byte one)
                    end += next((i for i, byte in enumerate(head) if byte & 0xC0 != 0x80), len(head))
                found.append((index, str(path), start, end - start))
                start = end
    return found


def read(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        return os.pread(handle.fileno(), length, offset)


def scan(block: Block, flag: str = "SOURCE") -> tuple[int, bool, str]:
    """(characters, all ASCII?, the distinct characters) of one block; bad text is one ReslabError line."""
    _, path, offset, length = block
    data = read(path, offset, length)
    if b"\0" in data:
        raise ReslabError(f"{flag} {path} looks binary (it contains NUL bytes); pass a UTF-8 text file")
    if data.isascii():
        seen = set(data[:SAMPLE])
        seen.update(data.translate(None, bytes(seen)))
        return len(data), True, "".join(map(chr, sorted(seen)))
    text = decode(data, path, offset, flag)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return len(text), False, "".join(map(chr, np.flatnonzero(np.bincount(codes)).tolist()))


def decode(data: bytes, path: str, offset: int, flag: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ReslabError(f"{flag} {path} is not UTF-8 (bad byte at offset {offset + err.start}); convert it, "
                          "e.g. iconv -t UTF-8") from err


# --------------------------------------------------------------------------------------------------- encoding


def shard_plans(found: list[Block], scans: list[tuple[int, bool, str]], size: int) -> list[list[Piece]]:
    """The pieces of blocks each shard's characters come from: shard k takes characters [k*size, (k+1)*size)."""
    plans: list[list[Piece]] = [[]]
    room = size
    for (_, path, offset, length), (characters, ascii, _) in zip(found, scans):
        used = 0
        while used < characters:
            if room == 0:
                plans.append([])
                room = size
            take = min(room, characters - used)
            if ascii:  # one byte a character: read only the piece
                plans[-1].append((path, offset + used, take, 0, take))
            else:
                plans[-1].append((path, offset, length, used, take))
            used, room = used + take, room - take
    return [plan for plan in plans if plan]


_tokenizers: dict[str, CharTokenizer] = {}


def ascii_table(chars: str) -> bytes:
    """byte -> id for the ASCII characters (ids below 128: they sort first); 255 for any other byte."""
    ids = {c: i for i, c in enumerate(chars) if c < "\x80"}
    return bytes(ids.get(chr(b), 255) for b in range(256))


def encode_shard(out: str, index: int, plan: list[Piece], chars: str, dtype: str) -> dict[str, Any]:
    """Encode one shard's pieces, write the shard atomically; its manifest entry (count, sha256, largest id)."""
    tokenizer = _tokenizers.get(chars) or _tokenizers.setdefault(chars, CharTokenizer(chars))
    table = ascii_table(chars)
    parts = []
    for path, offset, length, skip, take in plan:
        data = read(path, offset, length)
        if skip == 0 and take == len(data) and data.isascii():
            ids = np.frombuffer(data.translate(table), dtype=np.uint8)
            if ids.max(initial=0) >= 128:  # 255: a character the scan did not see
                raise ReslabError(f"{path} changed while it was being prepared; prepare it again")
            parts.append(ids)
        else:
            text = data.decode("utf-8")[skip:skip + take]
            parts.append(tokenizer.encode_array(text))
    ids = np.concatenate(parts).astype(dtype) if len(parts) > 1 or parts[0].dtype != dtype else parts[0]
    name = shard_name(index)
    atomic_write(Path(out) / name, memoryview(ids).cast("B"))
    return {"name": name, "tokens": len(ids), "sha256": hashlib.sha256(ids).hexdigest(), "max_id": int(ids.max())}


# ----------------------------------------------------------------------------------------------------- driver


WORKER_DIED = "a prepare worker died (killed?); run the same command again to resume"


@contextlib.contextmanager
def worker_deaths():
    """A worker killed mid-prepare (kill -9, the OOM killer) as one line saying how to resume, not a traceback."""
    try:
        yield
    except BrokenProcessPool as err:
        raise ReslabError(WORKER_DIED) from err


def _mapped(pool: Executor, fn: Callable, items: tuple) -> Iterator:
    with worker_deaths():  # submitting too: a worker may die between two maps, breaking the pool
        yield from pool.map(fn, *items)


def _start_worker(parent: int, initializer: Callable | None, initargs: tuple) -> None:
    """A worker dies with the prepare that started it (kill -9 included: it would otherwise write shards into --out,
    then idle forever, and with the workers gone multiprocessing's resource tracker ends too), and leaves Ctrl-C to
    the parent (which stops the prepare with one line): the terminal sends SIGINT to the whole process group, and a
    worker's own KeyboardInterrupt would print a traceback."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


class Workers:
    """`map(fn, items)` in order (or `pool.submit` under `worker_deaths`): in this process, or in `count` spawned
    processes, each started by `initializer(*initargs)`. A killed worker is an error, not a hang: concurrent.futures
    notices the death (multiprocessing.Pool waits forever for the dead worker's result)."""

    def __init__(self, count: int, initializer: Callable | None = None, initargs: tuple = ()):
        self.pool: Executor | None = None
        if count > 1:
            import multiprocessing

            self.pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start_worker, initargs=(os.getpid(), initializer, initargs))
        elif initializer is not None:
            initializer(*initargs)

    def map(self, fn: Callable, *items) -> Iterator:
        return map(fn, *items) if self.pool is None else _mapped(self.pool, fn, items)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
