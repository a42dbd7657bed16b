"""Token shards on disk, read memory-mapped: a corpus of any size costs page cache, not process memory.

Three layouts are read, all as one token stream (shards in order, as if concatenated):

    reslab           manifest.json + shard-00000.bin ... (raw uint16 or uint32) + tokenizer.reslab.json,
                     written by `reslab data prepare`; the first `split.train_tokens` tokens train, the rest validate
    nanoGPT          train.bin + val.bin (raw uint16), vocabulary from meta.pkl (read without unpickling objects)
                     or --vocab-size
    modded-nanogpt   *.bin shards with a 256 x int32 header (magic 20240520, version 1, token count), then uint16
                     tokens; files named *val* validate, the others train (no val file: the last 10% validates)

`TokenSpan.windows(starts, length)` gathers random windows as int64 (the only copy made); a window may cross from one
shard into the next, because the shards are pieces of one stream. Every defect a user can cause (an empty or
truncated shard, a manifest that disagrees with its shards, an id above the vocabulary) is a one-line ReslabError.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reslab.data.tokenizer import CharTokenizer, IdTokenizer, Tokenizer, load_tokenizer_file
from reslab.errors import ReslabError

MANIFEST = "manifest.json"
PREPARE_STATE = "prepare-state.json"  # present while a prepare is unfinished
TOKENIZER_FILE = "tokenizer.reslab.json"  # not tokenizer.json: that name belongs to run directories
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
    """What identifies a prepared corpus: tokenizer, dtype, vocabulary, each shard's count and checksum, split."""
    key = {k: record.get(k) for k in ("tokenizer", "dtype", "vocab_size", "split")}
    key["shards"] = [(s["name"], s["tokens"], s["sha256"]) for s in record["shards"]]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


class TokenSpan:
    """Tokens [begin, end) of a stream stored as several arrays (memmaps), read without copying the whole."""

    def __init__(self, arrays: list[np.ndarray], begin: int = 0, end: int | None = None):
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
        maps (a memmap slice is a Python object costing microseconds; a view's slice a fraction of one)."""
        absolute = np.asarray(starts, dtype=np.int64) + self.begin
        shards = np.searchsorted(self.bounds, absolute, side="right") - 1
        local = absolute - self.bounds[shards]
        out = np.empty((len(absolute), length), dtype=self.arrays[0].dtype)
        views, sizes = self._views()
        for row, (shard, start) in enumerate(zip(shards.tolist(), local.tolist())):
            if start + length <= sizes[shard]:
                out[row] = views[shard][start:start + length]
            else:  # the window runs on into the next shard(s)
                out[row] = self._crossing(shard, start, length)
        return out

    def _views(self) -> tuple[list[np.ndarray], list[int]]:
        if self._cached is None:
            self._cached = [np.asarray(a) for a in self.arrays], [len(a) for a in self.arrays]
        return self._cached

    def _crossing(self, shard: int, local: int, length: int) -> np.ndarray:
        pieces, filled = [], 0
        while filled < length:
            piece = self.arrays[shard][local:local + length - filled]
            pieces.append(piece)
            filled, shard, local = filled + len(piece), shard + 1, 0
        return np.concatenate(pieces)

    def to_numpy(self) -> np.ndarray:
        """All tokens as one int64 array (a copy: for tests and small data)."""
        return self.windows(np.array([0]), len(self))[0]


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
    raise ReslabError(f"--data {directory} is a directory but not prepared data (no {MANIFEST}, train.bin or "
                      "modded-nanogpt .bin shards); run reslab data prepare SOURCE --out DIR first")


# ------------------------------------------------------------------------------------------------------ reslab


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") != FORMAT:
            raise ValueError(f"format {record.get('format')!r}, not {FORMAT!r}")
        if record.get("version") != FORMAT_VERSION:
            raise ValueError(f"version {record.get('version')!r}; this reslab reads {FORMAT_VERSION}")
        for key in ("tokenizer", "dtype", "vocab_size", "shards", "split", "tokens"):
            record[key]  # noqa: B018 - present, or KeyError
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ReslabError(f"{path} is not a reslab manifest ({err}); prepare the data again") from err
    return record


def open_reslab(directory: Path, verify: bool = False) -> PreparedData:
    """A `reslab data prepare` directory: sizes always checked against the manifest, checksums when `verify`."""
    record = read_manifest(directory)
    dtype = np.dtype(record["dtype"])
    arrays = [_open_shard(directory / s["name"], dtype, s["tokens"], s.get("sha256") if verify else None)
              for s in record["shards"]]
    if sum(len(a) for a in arrays) != record["tokens"]:
        raise ReslabError(f"{directory / MANIFEST} counts {record['tokens']:,} tokens but its shards list "
                          f"{sum(len(a) for a in arrays):,}; prepare the data again")
    vocab = record["vocab_size"]
    for entry in record["shards"]:
        if entry.get("max_id", 0) >= vocab:
            raise ReslabError(f"{directory / entry['name']} holds token id {entry['max_id']}, above the "
                              f"vocabulary of {vocab}; prepare the data again with one tokenizer")
    tokenizer = load_tokenizer_file(directory / record["tokenizer"]["file"])
    if tokenizer.vocab_size != vocab:
        raise ReslabError(f"{directory / MANIFEST} says vocabulary {vocab} but its tokenizer has "
                          f"{tokenizer.vocab_size}; prepare the data again")
    train, val = TokenSpan(arrays).split(record["split"]["train_tokens"])
    summary = {"format": "reslab", "fingerprint": record.get("fingerprint") or fingerprint(record)}
    return PreparedData(tokenizer, train, val, _record(directory, summary, train, val))


def _open_shard(path: Path, dtype: np.dtype, tokens: int, sha256: str | None, offset: int = 0) -> np.ndarray:
    """One shard as a read-only memmap, refused if empty, truncated or (when asked) not the checksummed bytes."""
    if not path.is_file():
        raise ReslabError(f"{path} is missing; the data directory is incomplete: prepare it again")
    size = path.stat().st_size
    expected = offset + tokens * dtype.itemsize
    if tokens <= 0 or size <= offset:
        raise ReslabError(f"{path} is empty (no tokens); prepare the data again")
    if size != expected:
        raise ReslabError(f"{path} has {size:,} bytes, not the {expected:,} of its {tokens:,} {dtype.name} tokens: "
                          "truncated or replaced; prepare the data again")
    if sha256 is not None and file_sha256(path) != sha256:
        raise ReslabError(f"{path} does not match the checksum in its manifest: changed since it was prepared; "
                          "prepare the data again")
    array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(tokens,))
    _random_access(array)
    return array


def _random_access(array: np.memmap) -> None:
    """Tell the kernel reads are random: no readahead, so a window maps a few pages, not megabytes around it."""
    handle = getattr(array, "_mmap", None)
    if handle is not None and hasattr(mmap, "MADV_RANDOM"):
        with contextlib.suppress(OSError):
            handle.madvise(mmap.MADV_RANDOM)


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
    try:
        meta = _NoObjects(io.BytesIO(path.read_bytes())).load()
    except Exception as err:  # noqa: BLE001 - anything a damaged pickle raises
        raise ReslabError(f"{path} is not a plain-data meta.pkl ({err}); pass --vocab-size instead") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int):
        raise ReslabError(f"{path} has no integer vocab_size; pass --vocab-size instead")
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
    return PreparedData(tokenizer, train, val, _record(directory, summary, train, val))


def _open_raw(path: Path, dtype: np.dtype) -> np.ndarray:
    if not path.is_file():
        raise ReslabError(f"{path} is missing; nanoGPT data needs train.bin and val.bin")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ReslabError(f"{path} has {size:,} bytes, not a whole number of {dtype.name} tokens: truncated")
    return _open_shard(path, dtype, size // dtype.itemsize, None)


# ---------------------------------------------------------------------------------------------- modded-nanogpt


def _modded_header(path: Path) -> np.ndarray:
    with open(path, "rb") as handle:
        head = handle.read(MODDED_HEADER_INTS * 4)
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
        arrays.append(_open_shard(path, np.dtype(np.uint16), int(header[2]), None, offset=MODDED_HEADER_INTS * 4))
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
    return PreparedData(IdTokenizer(vocab), train, val, _record(paths[0].parent, summary, train, val))
