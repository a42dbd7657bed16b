"""Token shards on disk, read memory-mapped: a corpus of any size costs page cache, not process memory.

Three layouts are read, all as one token stream (shards in order, as if concatenated):

    reslab           manifest.json + shard-00000.bin ... (raw uint16 or uint32) + tokenizer.reslab.json,
                     written by `reslab data prepare`; the first `split.train_tokens` tokens train, the rest validate
    nanoGPT          train.bin + val.bin (raw uint16), vocabulary from meta.pkl (read without unpickling objects)
                     or --vocab-size
    modded-nanogpt   *.bin shards with a 256 x int32 header (magic 20240520, version 1, token count), then uint16
                     tokens; files named *val* validate, the others train (no val file: the last 10% validates)

`TokenSpan.windows(starts, length)` gathers random windows as int64 (the only copy made); a window may cross from one
shard into the next, because the shards are pieces of one stream. Each file is read through its map while a lease
guards it against other writers, else with pread (`reslab.data.tokenfiles`): a file truncated under a run is an
error, never a bus error.

`read_manifest` is the one reader of manifest.json: a declared schema, its sums, file names confined to the data
directory, and its own fingerprint (which covers everything that decides which tokens a run reads). Every defect a
user can cause (an edited or malformed manifest, an empty or truncated shard, an id above the vocabulary) is a
one-line ReslabError naming the file, the key and the fix.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reslab.data.tokenfiles import (
    TokenFile,
    lease_breaks,
    read_regular,
    reserve_descriptors,
    start_reading,
    stop_reading,
)
from reslab.data.tokenizer import CharTokenizer, IdTokenizer, Tokenizer, load_tokenizer_file
from reslab.errors import ReslabError
from reslab.io import Field, check_schema, confined_path, read_json_file

MANIFEST = "manifest.json"
PREPARE_STATE = "prepare-state.json"  # present while a prepare is unfinished
FORMAT = "reslab-tokens"
FORMAT_VERSION = 1
MODDED_MAGIC, MODDED_VERSION, MODDED_HEADER_INTS = 20240520, 1, 256
GPT2_VOCAB = 50257
TRAIN_FRACTION = 0.9
SCAN_BYTES = 1 << 23  # max-id scans read files in pieces this large (read, not mapped: RSS stays flat)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


def dtype_for(vocab_size: int) -> str:
    """uint16 while every id fits (vocab <= 65535), else uint32."""
    return "uint16" if vocab_size <= 65535 else "uint32"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(record: dict[str, Any]) -> str:
    """What identifies a prepared corpus: everything that decides which tokens a run reads and what they mean: the
    tokenizer (its file, kind and checksum), dtype, vocabulary, each shard's name, count and checksum, the split."""
    key = {k: record.get(k) for k in ("tokenizer", "dtype", "vocab_size", "split")}
    key["shards"] = [(s["name"], s["tokens"], s["sha256"]) for s in record["shards"]]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


class TokenSpan:
    """Tokens [begin, end) of a stream stored as several token files (or arrays), read without copying the whole."""

    def __init__(self, arrays: list[TokenFile | np.ndarray], begin: int = 0, end: int | None = None):
        self.arrays = arrays
        self.bounds = np.cumsum([0] + [len(a) for a in arrays])
        self.begin, self.end = begin, int(self.bounds[-1]) if end is None else end
        self._cached: tuple | None = None

    def __len__(self) -> int:
        return self.end - self.begin

    def split(self, n_first: int) -> tuple[TokenSpan, TokenSpan]:
        middle = self.begin + n_first
        return TokenSpan(self.arrays, self.begin, middle), TokenSpan(self.arrays, middle, self.end)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) int64: the tokens from each start (relative to this span)."""
        return self.gather(starts, length).astype(np.int64)

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) in the shards' own dtype: one slice copy per row from plain ndarray views of the
        maps (a memmap slice is a Python object costing microseconds; a view's slice a fraction of one); a file
        without a map (no lease guards it) slices with pread."""
        absolute = np.asarray(starts, dtype=np.int64) + self.begin
        shards = np.searchsorted(self.bounds, absolute, side="right") - 1
        local = absolute - self.bounds[shards]
        out = np.empty((len(absolute), length), dtype=self.arrays[0].dtype)
        start_reading()  # a lease that breaks from here on is held until this loop is done with its views
        views, sizes = self._views()
        try:
            for row, (shard, start) in enumerate(zip(shards.tolist(), local.tolist())):
                if start + length <= sizes[shard]:
                    out[row] = views[shard][start:start + length]
                else:  # the window runs on into the next shard(s)
                    out[row] = self._crossing(shard, start, length)
        finally:
            stop_reading()
        return out

    def _views(self) -> tuple[list[np.ndarray | TokenFile], list[int]]:
        """Each file's map, or the file itself where it is read with pread; rebuilt after a lease break."""
        if self._cached is None or self._cached[0] != lease_breaks():
            views = [_view(a) for a in self.arrays]
            self._cached = lease_breaks(), views, [len(a) for a in self.arrays]
        return self._cached[1], self._cached[2]

    def _crossing(self, shard: int, local: int, length: int) -> np.ndarray:
        pieces, filled = [], 0
        while filled < length:
            piece = _view(self.arrays[shard])[local:local + length - filled]
            pieces.append(piece)
            filled, shard, local = filled + len(piece), shard + 1, 0
        return np.concatenate(pieces)

    def changed(self) -> list[Path]:
        """The files another process opened for writing while this span was read (see `reslab.data.tokenfiles`)."""
        return [a.path for a in self.arrays if isinstance(a, TokenFile) and a.changed]

    def to_numpy(self) -> np.ndarray:
        """All tokens as one int64 array (a copy: for tests and small data)."""
        return self.windows(np.array([0]), len(self))[0]


def _view(array: TokenFile | np.ndarray) -> np.ndarray | TokenFile:
    """What a span slices: a token file's map, the file itself (pread) when it has none, or an array."""
    if isinstance(array, TokenFile):
        return array if array.view is None else array.view
    return np.asarray(array)


def max_id(path: Path, dtype: np.dtype, offset: int = 0) -> int:
    """The largest id in a token file, read in pieces of SCAN_BYTES (never mapped, never whole in memory)."""
    top = -1
    with open(path, "rb") as handle:
        handle.seek(offset)
        while block := handle.read(SCAN_BYTES - SCAN_BYTES % dtype.itemsize):
            top = max(top, int(np.frombuffer(block, dtype).max()))
    return top


@dataclass
class PreparedData:
    """An opened data directory: the tokenizer, the train and validation spans, and what to record in the run."""

    tokenizer: Tokenizer
    train: TokenSpan
    val: TokenSpan
    record: dict[str, Any] = field(default_factory=dict)
    files: list[TokenFile] = field(default_factory=list)  # every file the spans read, in stream order
    shards: dict[str, TokenFile] = field(default_factory=dict)  # a reslab directory's: by their manifest names


def check_vocab_flag(directory: Path, vocab_size: int | None) -> None:
    """`--vocab-size` names the vocabulary of token files that do not record it (nanoGPT without meta.pkl,
    modded-nanogpt); a reslab directory records its own, so the flag would be ignored there: refused instead."""
    if vocab_size is not None and (Path(directory) / MANIFEST).exists():
        raise ReslabError(f"--vocab-size does not apply to {directory}: its {MANIFEST} records the vocabulary "
                          "(--vocab-size is for nanoGPT data without meta.pkl and modded-nanogpt shards); drop it")


def open_prepared(directory: Path, vocab_size: int | None = None, verify: bool = False) -> PreparedData:
    """Open a prepared directory of any of the three layouts (see the module docstring)."""
    directory = Path(directory)
    if (directory / MANIFEST).exists():
        return open_reslab(directory, verify)
    if (directory / "train.bin").exists():
        return open_nanogpt(directory, vocab_size)
    bins = sorted(directory.glob("*.bin"))
    if (directory / PREPARE_STATE).exists():
        raise ReslabError(f"--data {directory} is a directory with an unfinished prepare (no {MANIFEST} yet); run the "
                          "same reslab data prepare command again to finish it")
    if bins and _is_modded(bins[0]):
        return open_modded(bins, vocab_size)
    if bins and any(_is_modded(path) for path in bins[1:]):  # refused by name: the first is not a shard
        return open_modded(bins, vocab_size)
    raise ReslabError(f"--data {directory} is a directory but not prepared data (no {MANIFEST}, train.bin or "
                      "modded-nanogpt .bin shards); run reslab data prepare SOURCE --out DIR first")


# ------------------------------------------------------------------------------------------------------ reslab


_HEX64 = re.compile(r"[0-9a-f]{64}")
SHARD_SCHEMA = {"name": Field(str, minimum=1), "tokens": Field(int, minimum=1), "sha256": Field(str),
                "max_id": Field(int, minimum=0, required=False)}
MANIFEST_SCHEMA = {
    "format": Field(str, choices=(FORMAT,)),
    "version": Field(int, choices=(FORMAT_VERSION,)),
    "tokenizer": Field(dict, keys={"file": Field(str, minimum=1), "kind": Field(str, required=False),
                                   "sha256": Field(str, required=False)}),
    "dtype": Field(str, choices=("uint16", "uint32")),
    "vocab_size": Field(int, minimum=1, maximum=2**32),
    "tokens": Field(int, minimum=1),
    "characters": Field(int, minimum=0, required=False),
    "split": Field(dict, keys={"train_tokens": Field(int, minimum=0), "val_tokens": Field(int, minimum=0,
                                                                                         required=False)}),
    "shards": Field(list, minimum=1, items=SHARD_SCHEMA),
    "fingerprint": Field(str),
    "job": Field(dict, required=False),
}
MANIFEST_FIX = "prepare the data again"


def read_manifest(directory: Path) -> dict[str, Any]:
    """manifest.json, validated: its schema, its sums, its file names (inside the directory) and its fingerprint.
    Any violation is one line naming the file, the key and the fix."""
    path = Path(directory) / MANIFEST
    record = read_json_file(path, MANIFEST_FIX, what="manifest")
    check_schema(record, MANIFEST_SCHEMA, str(path), MANIFEST_FIX)
    _check_manifest_sums(record, path)
    names = [confined_path(directory, s["name"], str(path), f"shards[{i}].name", MANIFEST_FIX)
             for i, s in enumerate(record["shards"])]
    confined_path(directory, record["tokenizer"]["file"], str(path), "tokenizer.file", MANIFEST_FIX)
    if len(set(names)) != len(names):
        twice = next(s["name"] for i, s in enumerate(record["shards"]) if names[i] in names[:i])
        raise ReslabError(f"{path}: shards lists {twice!r} twice; {MANIFEST_FIX}")
    if fingerprint(record) != record["fingerprint"]:
        raise ReslabError(f"{path} does not match its own fingerprint: edited since it was prepared (dtype, split, "
                          f"shards or tokenizer); {MANIFEST_FIX}")
    return record


def _check_manifest_sums(record: dict[str, Any], path: Path) -> None:
    """What the schema cannot say: checksums are sha256 hex, the counts add up, the split fits, ids fit."""
    hexes = [("fingerprint", record["fingerprint"]), ("tokenizer.sha256", record["tokenizer"].get("sha256", "0" * 64))]
    hexes += [(f"shards[{i}].sha256", s["sha256"]) for i, s in enumerate(record["shards"])]
    for key, value in hexes:
        if not _HEX64.fullmatch(value):
            raise ReslabError(f"{path}: {key} must be a sha256 (64 hex digits), got {value[:70]!r}; {MANIFEST_FIX}")
    tokens, split = record["tokens"], record["split"]
    listed = sum(s["tokens"] for s in record["shards"])
    problems = [(listed != tokens, f"tokens is {tokens:,} but its shards list {listed:,}"),
                (split["train_tokens"] > tokens, f"split.train_tokens {split['train_tokens']:,} is more than the "
                                                 f"{tokens:,} tokens"),
                (split.get("val_tokens", tokens - split["train_tokens"]) != tokens - split["train_tokens"],
                 "split.val_tokens is not tokens - split.train_tokens")]
    problems += [(s.get("max_id", 0) >= record["vocab_size"], f"shards[{i}].max_id {s.get('max_id')} is not below "
                  f"vocab_size {record['vocab_size']} (ids from another tokenizer)")
                 for i, s in enumerate(record["shards"])]
    for bad, problem in problems:
        if bad:
            raise ReslabError(f"{path}: {problem}; {MANIFEST_FIX}")


def open_reslab(directory: Path, verify: bool = False) -> PreparedData:
    """A `reslab data prepare` directory: the manifest validated, every shard's size checked against it (each read
    through a guarded map, `reslab.data.tokenfiles`), and every checksum when `verify`."""
    directory = Path(directory)
    record = read_manifest(directory)
    dtype = np.dtype(record["dtype"])
    reserve_descriptors(len(record["shards"]))
    files = [_open_shard(directory / s["name"], dtype, s["tokens"]) for s in record["shards"]]
    for file, entry in zip(files, record["shards"]):
        file.sha256 = entry["sha256"]
    if verify:
        check_checksums(files, "changed since it was prepared; prepare the data again")
    tokenizer = _manifest_tokenizer(directory, record)
    train, val = TokenSpan(files).split(record["split"]["train_tokens"])
    summary = {"format": "reslab", "fingerprint": record["fingerprint"]}
    shards = {entry["name"]: file for file, entry in zip(files, record["shards"])}
    data = PreparedData(tokenizer, train, val, _record(directory, summary, train, val), files, shards)
    data.record["shard_stats"] = {name: file.signature for name, file in shards.items()}  # see check_unchanged
    return data


def check_unchanged(data: PreparedData, recorded: Any, fix: str) -> None:
    """Each shard of a reslab directory holds the bytes it held when `recorded` (a run's `shard_stats`) was taken:
    a shard with the same size, mtime and ctime is unchanged (any write or truncation moves its ctime, which only
    a clock set back could restore), and any other is hashed against its manifest checksum. One stat a shard when
    nothing changed; a moved or copied directory is hashed in full."""
    recorded = recorded if isinstance(recorded, dict) else {}
    check_checksums([file for name, file in data.shards.items() if recorded.get(name) != file.signature], fix)


def _manifest_tokenizer(directory: Path, record: dict[str, Any]) -> Tokenizer:
    """The manifest's tokenizer file, checked against its checksum (when recorded) and the vocabulary."""
    path = directory / record["tokenizer"]["file"]
    tokenizer = load_tokenizer_file(path)
    expected = record["tokenizer"].get("sha256")
    if expected is not None and file_sha256(path) != expected:
        raise ReslabError(f"{path} does not match the checksum in {directory / MANIFEST}: changed since it was "
                          f"prepared; {MANIFEST_FIX}")
    if tokenizer.vocab_size != record["vocab_size"]:
        raise ReslabError(f"{directory / MANIFEST} says vocabulary {record['vocab_size']} but its tokenizer has "
                          f"{tokenizer.vocab_size}; {MANIFEST_FIX}")
    return tokenizer


def check_checksums(files: list[TokenFile], fix: str) -> None:
    """Hash each file (its open descriptor: the bytes a run reads) against its `sha256`, one thread a core
    (hashlib and pread release the GIL); the first that differs is one line naming it."""
    files = [file for file in files if file.sha256 is not None]
    if not files:
        return
    pool = ThreadPoolExecutor(min(len(files), _cores()))
    try:
        for file, digest in zip(files, pool.map(_descriptor_sha256, files)):
            if digest != file.sha256:
                raise ReslabError(f"{file.path} does not match the checksum in its manifest: {fix}")
    finally:
        pool.shutdown(cancel_futures=True)  # the first mismatch is enough: the shards not yet hashed are not


def _descriptor_sha256(file: TokenFile) -> str:
    digest, position = hashlib.sha256(), 0
    while block := os.pread(file.fd, 1 << 22, position):
        digest.update(block)
        position += len(block)
    return digest.hexdigest()


def _open_shard(path: Path, dtype: np.dtype, tokens: int, offset: int = 0) -> TokenFile:
    """One shard, opened and guarded (`reslab.data.tokenfiles`), refused if missing, empty or not its size."""
    file = TokenFile(path, dtype, offset, tokens, "the data directory is incomplete: prepare it again")
    expected = offset + tokens * dtype.itemsize
    if tokens <= 0 or file.size <= offset:
        raise ReslabError(f"{path} is empty (no tokens); prepare the data again")
    if file.size != expected:
        raise ReslabError(f"{path} has {file.size:,} bytes, not the {expected:,} of its {tokens:,} {dtype.name} "
                          "tokens: truncated or replaced; prepare the data again")
    return file.guard()


def _record(directory: Path, summary: dict[str, Any], train: TokenSpan, val: TokenSpan) -> dict[str, Any]:
    tokens = len(train) + len(val)
    return {"source": str(directory), "description": f"{directory}: {summary['format']} data, {tokens:,} tokens",
            "sha256": summary["fingerprint"], **summary, "tokens": tokens, "train_tokens": len(train),
            "val_tokens": len(val)}


def _quick_fingerprint(paths: list[Path]) -> str:
    """For data without a manifest: each file's name, size and the sha256 of its first and last MiB."""
    digest = hashlib.sha256()
    for path in paths:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}:".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()


def _check_ids(paths: list[Path], vocab: int, offset: int = 0) -> None:
    """Refuse ids outside the vocabulary on open (they would index past the embedding)."""
    for path in paths:
        top = max_id(path, np.dtype(np.uint16), offset)
        if top >= vocab:
            raise ReslabError(f"{path} holds token id {top}, above the vocabulary of {vocab}; pass the right "
                              "--vocab-size or the data's own vocabulary")


# ----------------------------------------------------------------------------------------------------- nanoGPT


class _NoObjects(pickle.Unpickler):
    """Unpickles plain data only (dicts, lists, strings, numbers); any class or function is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, and only plain data is read")


def read_meta_pkl(path: Path) -> dict[str, Any]:
    """nanoGPT's meta.pkl ({'vocab_size', 'itos', 'stoi'}), parsed without running any code it could name."""
    data = read_regular(path, "pass --vocab-size instead, or put nanoGPT's meta.pkl there")
    try:
        meta = _NoObjects(io.BytesIO(data)).load()
    except Exception as err:  # noqa: BLE001 - anything a damaged pickle raises
        raise ReslabError(f"{path} is not a plain-data meta.pkl ({err}); pass --vocab-size instead") from err
    vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or not 1 <= vocab <= 2**32:
        raise ReslabError(f"{path} has no vocab_size that is an integer in [1, 2^32] (got {vocab!r:.40}); pass "
                          "--vocab-size instead")
    return meta


def _nanogpt_tokenizer(directory: Path, vocab_size: int | None) -> Tokenizer:
    meta_path = directory / "meta.pkl"
    if not meta_path.exists():
        if vocab_size is None:
            raise ReslabError(f"{directory} has train.bin but no meta.pkl; pass --vocab-size (e.g. {GPT2_VOCAB} for "
                              "GPT-2 tokens)")
        return IdTokenizer(vocab_size)
    meta = read_meta_pkl(meta_path)
    itos = meta.get("itos")
    if isinstance(itos, dict) and sorted(itos) == list(range(meta["vocab_size"])):
        chars = "".join(str(itos[i]) for i in range(meta["vocab_size"]))
        if len(chars) == meta["vocab_size"] and list(chars) == sorted(set(chars)):
            return CharTokenizer(chars)  # nanoGPT's char datasets: the same sorted-characters vocabulary
    return IdTokenizer(vocab_size or meta["vocab_size"])


def open_nanogpt(directory: Path, vocab_size: int | None = None) -> PreparedData:
    tokenizer = _nanogpt_tokenizer(directory, vocab_size)
    paths = [directory / "train.bin", directory / "val.bin"]
    arrays = [_open_raw(path, np.dtype(np.uint16)) for path in paths]
    _check_ids(paths, tokenizer.vocab_size)
    train, val = TokenSpan(arrays[:1]), TokenSpan(arrays[1:])
    summary = {"format": "nanogpt", "fingerprint": _quick_fingerprint(paths)}
    return PreparedData(tokenizer, train, val, _record(directory, summary, train, val), arrays)


def _open_raw(path: Path, dtype: np.dtype) -> TokenFile:
    fix = "nanoGPT data needs train.bin and val.bin, both regular files"
    file = TokenFile(path, dtype, 0, 0, fix)  # opened once: the size checked is the size of the file read
    if file.size % dtype.itemsize:
        raise ReslabError(f"{path} has {file.size:,} bytes, not a whole number of {dtype.name} tokens: truncated")
    if file.size == 0:
        raise ReslabError(f"{path} is empty (no tokens); prepare the data again")
    file.tokens = file.size // dtype.itemsize
    return file.guard()


# ---------------------------------------------------------------------------------------------- modded-nanogpt


def _modded_header(path: Path) -> np.ndarray:
    head = read_regular(path, "keep only modded-nanogpt shards (regular files) in the directory",
                        MODDED_HEADER_INTS * 4)
    return np.frombuffer(head[:len(head) // 4 * 4], dtype=np.int32)


def _is_modded(path: Path) -> bool:
    header = _modded_header(path)
    return len(header) > 0 and int(header[0]) == MODDED_MAGIC


def open_modded(paths: list[Path], vocab_size: int | None = None) -> PreparedData:
    """modded-nanogpt shards (fineweb_train_000001.bin, fineweb_val_000000.bin, ...); GPT-2 ids by default."""
    arrays = []
    for path in paths:
        header = _modded_header(path)
        if len(header) < MODDED_HEADER_INTS or int(header[0]) != MODDED_MAGIC or int(header[1]) != MODDED_VERSION:
            raise ReslabError(f"{path} is not a modded-nanogpt shard (header magic {MODDED_MAGIC}, version "
                              f"{MODDED_VERSION}); keep only such shards in the directory")
        if int(header[2]) < 1:
            raise ReslabError(f"{path}: its header counts {int(header[2])} tokens; a modded-nanogpt shard holds at "
                              "least one: keep only such shards in the directory")
        arrays.append(_open_shard(path, np.dtype(np.uint16), int(header[2]), offset=MODDED_HEADER_INTS * 4))
    vocab = vocab_size or GPT2_VOCAB
    _check_ids(paths, vocab, MODDED_HEADER_INTS * 4)
    is_val = ["val" in path.name for path in paths]
    if any(is_val) and not all(is_val):
        train = TokenSpan([a for a, v in zip(arrays, is_val) if not v])
        val = TokenSpan([a for a, v in zip(arrays, is_val) if v])
    else:
        stream = TokenSpan(arrays)
        train, val = stream.split(int(len(stream) * TRAIN_FRACTION))
    summary = {"format": "modded-nanogpt", "fingerprint": _quick_fingerprint(paths)}
    return PreparedData(IdTokenizer(vocab), train, val, _record(paths[0].parent, summary, train, val), arrays)


def _cores() -> int:
    """The cores this process may run on (Linux: its affinity; elsewhere every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
