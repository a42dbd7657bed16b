"""Tokenizers: characters, or byte-level BPE trained locally with HF `tokenizers`.

Both save to one plain-JSON file, `tokenizer.reslab.json` (`rundir.TOKENIZER`), inside a run folder, with a `kind`
field so `load_tokenizer` can restore either one exactly (same ids, same decode). Never pickle: a run folder is data
that may come from someone else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from reslab.checks import OnlyWith, check_applies
from reslab.checks import check_positive
from reslab.errors import ReslabError, unknown
from reslab.io import Field, atomic_write, check_schema, read_json_file
from reslab.rundir import OLD_TOKENIZER
from reslab.rundir import TOKENIZER as FILENAME

FILE_FORMAT = 1
DEFAULT_BPE_VOCAB = 512
BYTE_ALPHABET = 256  # byte-level BPE starts from one token per byte
MAX_BPE_VOCAB = 1 << 20  # HF's trainer allocates tables this large up front: 2^31 aborts the process (no error)
PIECE_CHARS = 2000  # BPE encodes a corpus in pieces of about this size
_SAFE_CUT = re.compile(r"(?<=[!-~]\n)(?=[!-~])")  # a newline between two printable ASCII characters


class Tokenizer:
    """Text <-> token ids. Subclasses set `kind` and implement the four methods below."""

    kind: ClassVar[str] = ""

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """The ids as a 1-D int64 array: the fast path for a whole corpus (no Python list of a million ints)."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """The text of `ids` (a list, or a 1-D tensor or array, which are converted)."""
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        """The JSON body saved under `kind` and `format`."""
        raise NotImplementedError

    def save(self, directory: Path, name: str = FILENAME) -> None:
        """Write `directory/name` (atomically, so a crash cannot leave a truncated tokenizer)."""
        atomic_write(Path(directory) / name, self.to_bytes())

    def to_bytes(self) -> bytes:
        """The file `save` writes: the same tokenizer always gives the same bytes (so they can be compared)."""
        record = {"kind": self.kind, "format": FILE_FORMAT, **self.to_json()}
        return json.dumps(record, indent=1).encode("utf-8")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    """One token per character; the vocabulary is the sorted set of the training text's characters."""

    kind = "char"

    def __init__(self, chars: str):
        if not chars:
            raise ReslabError("cannot build a char tokenizer from empty text; pass a corpus with text in it")
        if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise ReslabError("a char tokenizer's vocabulary must be sorted, distinct characters; rebuild it")
        self.chars = chars
        self._codes = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
        # A table indexed by codepoint (its last slot stands for every codepoint above the vocabulary's): encoding
        # is one gather for all characters at once, about 10x faster than a binary search per character.
        self._table = np.full(int(self._codes.max()) + 2, -1, dtype=np.int64)
        self._table[self._codes] = np.arange(len(self._codes))

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = self._table[np.minimum(codes, len(self._table) - 1)]
        if ids.size and ids.min() < 0:
            self._unknown(text, int(np.argmax(ids < 0)))
        return ids

    def _unknown(self, text: str, position: int) -> None:
        char = text[position]
        raise ReslabError(
            f"character {char!r} (U+{ord(char):04X}, at offset {position}) is not in the char tokenizer's "
            f"{self.vocab_size}-character vocabulary; remove it from the text or rebuild the tokenizer on text "
            "that has it"
        )

    def decode(self, ids: list[int]) -> str:
        ids = _checked_ids(ids, self.vocab_size)
        return "".join(map(self.chars.__getitem__, ids))

    def to_json(self) -> dict[str, Any]:
        return {"chars": list(self.chars)}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> CharTokenizer:
        return cls("".join(record["chars"]))


BPE_ONLY = {name: OnlyWith("tokenizer", ("bpe",)) for name in ("vocab_size", "bpe_sample_mb")}


def check_bpe_settings(tokenizer: str, **given) -> None:
    """Refuse a BPE setting (`vocab_size`, `bpe_sample_mb`; None: not given) with another tokenizer, which brings its
    own vocabulary and would ignore it."""
    check_applies([name for name, value in given.items() if value is not None], {"tokenizer": tokenizer}, BPE_ONLY)


def check_bpe_vocab(vocab_size: int) -> None:
    check_positive(**{"--vocab-size": vocab_size})
    if vocab_size < BYTE_ALPHABET:
        raise ReslabError(f"--vocab-size {vocab_size} is too small for byte-level BPE; use at least {BYTE_ALPHABET}")
    if vocab_size > MAX_BPE_VOCAB:
        raise ReslabError(f"--vocab-size {vocab_size:,} is too large for a BPE trained here; use at most "
                          f"{MAX_BPE_VOCAB:,} (GPT-2 has 50,257)")


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style): any text encodes, and decode(encode(text)) == text exactly."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self._hf = hf_tokenizer
        self._fast: Any = None  # the tiktoken encoder of the same BPE (reslab.data.fast_bpe), once looked for
        self._fast_checked = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fast": None, "_fast_checked": False}  # a copy looks for its own encoder

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        """Learn merges from `text` alone, on this machine: the same text and size give the same tokenizer."""
        check_bpe_vocab(vocab_size)
        if not text:
            raise ReslabError("cannot train a BPE tokenizer on empty text; pass a corpus with text in it")
        return cls.train_from_lines(text.splitlines(keepends=True), vocab_size)

    @classmethod
    def train_from_lines(cls, lines: Iterable[str], vocab_size: int) -> BPETokenizer:
        """`train` on text given as its lines (any iterable: a corpus streamed from disk); the same lines give the
        same tokenizer as `train` on their concatenation."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        check_bpe_vocab(vocab_size)
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        hf.train_from_iterator(lines, trainer=trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        """The learned size: at most the requested --vocab-size, less when the text has too few merges to make."""
        return self._hf.get_vocab_size()

    def encode_array(self, text: str) -> np.ndarray:
        """The ids, from tiktoken when it is installed and reproduces this BPE exactly (several times faster than
        HF; `reslab.data.fast_bpe` checks exactness), else from HF."""
        if not self._fast_checked:
            from reslab.data.fast_bpe import fast_encoder

            self._fast, self._fast_checked = fast_encoder(self._hf), True
        if self._fast is None:
            return self._hf_encode_array(text)
        return self._fast.encode_to_numpy(text, allowed_special="all").astype(np.int64)

    def _hf_encode_array(self, text: str) -> np.ndarray:
        """Encode with HF in pieces cut where the result cannot change, so HF encodes them in parallel.

        HF is several times slower on one 1 MB string than on the same text in a few thousand pieces. The
        pieces give exactly the ids of the whole, because each cut is a newline between two printable ASCII
        characters: byte-level pre-tokenization always ends a token at such a newline (a lone whitespace
        token) and starts a new one after it, and BPE never merges across pre-tokens.
        """
        encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)  # fast: no offsets computed
        try:
            pieces = encode(_pieces(text))
        except Exception as error:  # noqa: BLE001 (the tokenizers library raises a bare Exception)
            raise self._unencodable(text, error) from None
        return np.concatenate([np.asarray(piece.ids, dtype=np.int64) for piece in pieces])

    def _unencodable(self, text: str, error: Exception) -> ReslabError:
        """The one-line error for text this tokenizer cannot encode (a word-level vocabulary with no unknown token,
        as a folder's tokenizer.json may have): the first character it refuses, where it is."""
        for char in sorted(set(text), key=text.index):
            try:
                self._hf.encode(char)
            except Exception:  # noqa: BLE001
                return ReslabError(f"character {char!r} (U+{ord(char):04X}, at offset {text.index(char)}) is not in "
                                   "the tokenizer's vocabulary, which has no unknown token; remove it from the text")
        return ReslabError(f"the tokenizer cannot encode this text ({' '.join(str(error).split())}); check the text")

    def decode(self, ids: list[int]) -> str:
        return self._hf.decode(_checked_ids(ids, self.vocab_size))

    def to_json(self) -> dict[str, Any]:
        return {"hf_tokenizer": json.loads(self._hf.to_str())}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(json.dumps(record["hf_tokenizer"])))


def _pieces(text: str) -> list[str]:
    """`text` cut into pieces of about PIECE_CHARS characters, at newlines where BPE ids cannot change."""
    cuts = [0]
    while (cut := _SAFE_CUT.search(text, cuts[-1] + PIECE_CHARS)) is not None:
        cuts.append(cut.start())
    cuts.append(len(text))
    return [text[start:end] for start, end in zip(cuts, cuts[1:])]


class IdTokenizer(Tokenizer):
    """Token ids without their text: data prepared elsewhere (nanoGPT or modded-nanogpt bins, no vocabulary).

    Text is written as the ids separated by spaces, both ways, so `reslab sample` still runs and shows the ids.
    """

    kind = "ids"

    def __init__(self, size: int):
        check_positive(vocab_size=size)
        self.size = int(size)

    @property
    def vocab_size(self) -> int:
        return self.size

    def encode_array(self, text: str) -> np.ndarray:
        try:
            ids = np.array([int(word) for word in text.split()], dtype=np.int64)
        except ValueError as err:
            raise ReslabError(f"this run's tokenizer has no text, only ids: give the prompt as ids ({err})") from err
        _checked_ids(ids, self.size)
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, _checked_ids(ids, self.size)))

    def to_json(self) -> dict[str, Any]:
        return {"vocab_size": self.size}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> IdTokenizer:
        return cls(record["vocab_size"])


TOKENIZERS: dict[str, type[Tokenizer]] = {"char": CharTokenizer, "bpe": BPETokenizer, "ids": IdTokenizer}


def _checked_ids(ids, vocab_size: int) -> list[int]:
    """`ids` as a list of ints, refusing ids from another tokenizer: they would decode to silent garbage."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if ids and not (0 <= min(ids) and max(ids) < vocab_size):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise ReslabError(
            f"token id {bad} is outside the tokenizer's vocabulary of {vocab_size}; "
            "use the tokenizer saved with the model"
        )
    return ids


def build_tokenizer(kind: str, text: str, vocab_size: int | None = None) -> Tokenizer:
    """Train a tokenizer of `kind` ("char" or "bpe") on `text`.

    vocab_size is the BPE target (default DEFAULT_BPE_VOCAB); a char tokenizer's size is set by the text, so
    it ignores vocab_size.
    """
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "bpe":
        return BPETokenizer.train(text, DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size)
    raise unknown("tokenizer", kind, TOKENIZERS)


def load_tokenizer(directory: Path) -> Tokenizer:
    """Restore the tokenizer that `Tokenizer.save(directory)` wrote (in a run written before reslab's file had its
    own name, OLD_TOKENIZER)."""
    for name in (FILENAME, OLD_TOKENIZER):
        if (Path(directory) / name).is_file():
            return load_tokenizer_file(Path(directory) / name)
    raise ReslabError(f"no {FILENAME} (nor {OLD_TOKENIZER}, its name in older runs) in {directory}; pass the run "
                      "folder the model was trained in")


TOKENIZER_FIX = "retrain to write a new one"
TOKENIZER_SCHEMA = {"kind": Field(str, choices=tuple(TOKENIZERS)), "format": Field(int, choices=(FILE_FORMAT,))}
KIND_SCHEMAS = {
    "char": {"chars": Field(list, minimum=1, items=Field(str, minimum=1, maximum=1))},
    "bpe": {"hf_tokenizer": Field(dict)},
    "ids": {"vocab_size": Field(int, minimum=1, maximum=2**32)},
}


def load_tokenizer_file(path: Path) -> Tokenizer:
    """A tokenizer file: reslab's own (any kind; its schema checked), or a Hugging Face `tokenizer.json` (as
    byte-level BPE). Any defect is one line naming the file and the key."""
    record = read_json_file(path, TOKENIZER_FIX, what="tokenizer file")
    if isinstance(record, dict) and "model" in record and "kind" not in record:
        return _hf_tokenizer_file(path)
    check_schema(record, TOKENIZER_SCHEMA, str(path), TOKENIZER_FIX)
    check_schema(record, KIND_SCHEMAS[record["kind"]], str(path), TOKENIZER_FIX)
    try:
        return TOKENIZERS[record["kind"]].from_json(record)
    except ReslabError as err:
        raise ReslabError(f"{path}: {err}") from None
    except Exception as err:  # HF tokenizers reports a bad JSON body as a bare Exception
        raise ReslabError(f"{path} is damaged ({err}); {TOKENIZER_FIX}") from err


def _hf_tokenizer_file(path: Path) -> BPETokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return BPETokenizer(HFTokenizer.from_file(str(path)))
    except Exception as err:  # HF reports a bad file as a bare Exception
        raise ReslabError(f"{path} is not a tokenizer file tokenizers can read ({err})") from err
