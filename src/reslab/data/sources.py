"""Text sources read as a stream: never the whole corpus in memory, always cut where tokenization cannot change.

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
from collections.abc import Iterator
from pathlib import Path

from reslab.data.chunk import Chunk
from reslab.errors import ReslabError

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
