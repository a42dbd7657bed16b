"""The data layer: corpora (built-in, downloaded, files), tokenizers, splits and batch sampling."""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from reslab.data import (
    BatchSampler,
    CharTokenizer,
    build_tokenizer,
    check_length,
    default_cache_dir,
    encode_corpus,
    load_text,
    load_tokenizer,
    split_tokens,
)
from reslab.data import sources as corpus_module
from reslab.data import tokenizer as tokenizer_module
from reslab.data.shakespeare import markdown_to_text, play_files, plays_directory
from reslab.errors import ReslabError

SPEAKER_LINE = re.compile(r"^[A-Za-z][^\n:]*:$")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """No test may read or write the user's real cache."""
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture(scope="session")
def shakespeare_cache(tmp_path_factory) -> Path:
    """The default corpus is built once per session, into a cache folder the tests share."""
    cache = tmp_path_factory.mktemp("reslab-cache")
    load_text("shakespeare", cache_dir=cache)
    return cache


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------- markdown conversion

PLAY_SNIPPET = """# The Test Play

## ACT I

### SCENE I. A street.

_Enter a company of Citizens, with staves, clubs, and other
weapons_

**First Citizen**  
Before we proceed any further, hear me speak.

**All**  
Speak, speak.

**First Citizen**  
You are all resolved rather to die than to famish?  
_\\[Aside]_  
I say it \\--and I mean it—truly, _truly_.

_Shouts within_

What shouts are these?

**MENENIUS & Second Citizen**  
[Within]_  
Peace, ho!

*Exit.*

### SCENE II. Another street.

A line nobody speaks.

**BRUTUS**  
He'll __\\[ ]_  
Not stay. *[Drawing his.]*
"""

PLAY_TEXT = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?
I say it --and I mean it--truly, truly.
What shouts are these?

MENENIUS & Second Citizen:
Peace, ho!

BRUTUS:
He'll
Not stay.
"""


def test_markdown_play_becomes_tinyshakespeare_text():
    assert markdown_to_text(PLAY_SNIPPET) == PLAY_TEXT


def test_an_unclosed_stage_direction_ends_at_the_blank_line():
    snippet = "**HAMLET**  \nTo be.\n\n_Enter Ghost, never closed\n\nOr not to be.\n"
    assert markdown_to_text(snippet) == "HAMLET:\nTo be.\nOr not to be.\n"


def test_plays_are_read_in_a_fixed_order():
    plays = plays_directory()
    files = play_files(plays)
    assert len(files) >= 30
    assert [f.relative_to(plays).as_posix() for f in files] == sorted(f.relative_to(plays).as_posix() for f in files)


def test_shakespeare_corpus_is_large_plain_and_cached(shakespeare_cache):
    start = time.perf_counter()
    text, description = load_text(None, cache_dir=shakespeare_cache)  # None means the default corpus
    assert time.perf_counter() - start < 1.0, "a second load should read the cache, not rebuild"
    assert len(text) > 4_000_000
    assert text.isascii()
    assert not set("_#*[]\\") & set(text)
    assert SPEAKER_LINE.match(text.split("\n", 1)[0])
    speeches = text.rstrip("\n").split("\n\n")
    assert len(speeches) > 30_000
    assert all(SPEAKER_LINE.match(s.split("\n", 1)[0]) and "\n" in s for s in speeches[:2000])
    assert "shakespeare" in description and "plays" in description
    cached = list(shakespeare_cache.iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".txt"  # no temporary file left behind
    assert cached[0].read_text(encoding="utf-8") == text


# ------------------------------------------------------------------------------------------ tinyshakespeare


def _opener(payload: bytes | Exception):
    """A stand-in for urlopen: returns `payload` as a response, or raises it."""

    def open_url(url, timeout):
        assert url == corpus_module.TINYSHAKESPEARE_URL and timeout <= 10
        if isinstance(payload, Exception):
            raise payload
        return io.BytesIO(payload)

    return open_url


@pytest.mark.parametrize("failure", [urllib.error.URLError("no route to host"), TimeoutError("timed out")])
def test_tinyshakespeare_offline_says_to_pass_data(tmp_path, monkeypatch, failure):
    monkeypatch.setattr(corpus_module, "_open_url", _opener(failure))
    with pytest.raises(ReslabError) as excinfo:
        load_text("tinyshakespeare", cache_dir=tmp_path)
    message = one_line_error(excinfo)
    assert "cannot download tinyshakespeare" in message and "--data PATH" in message
    assert list(tmp_path.iterdir()) == []


def test_tinyshakespeare_wrong_checksum_leaves_nothing_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "_open_url", _opener(b"First Citizen:\nnot the real file\n"))
    with pytest.raises(ReslabError) as excinfo:
        load_text("tinyshakespeare", cache_dir=tmp_path)
    assert "sha256" in one_line_error(excinfo)
    assert list(tmp_path.iterdir()) == []


def test_tinyshakespeare_download_is_cached_and_reused(tmp_path, monkeypatch):
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    monkeypatch.setattr(corpus_module, "TINYSHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(corpus_module, "_open_url", _opener(payload))
    text, description = load_text("tinyshakespeare", cache_dir=tmp_path)
    assert text == payload.decode() and "tinyshakespeare" in description
    assert [p.name for p in tmp_path.iterdir()] == ["tinyshakespeare.txt"]
    monkeypatch.setattr(corpus_module, "_open_url", _opener(urllib.error.URLError("offline now")))
    assert load_text("tinyshakespeare", cache_dir=tmp_path)[0] == text


def test_a_corrupt_cached_tinyshakespeare_is_fetched_again(tmp_path, monkeypatch):
    payload = b"All:\nSpeak, speak.\n"
    monkeypatch.setattr(corpus_module, "TINYSHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())
    (tmp_path / "tinyshakespeare.txt").write_bytes(payload[:5])
    monkeypatch.setattr(corpus_module, "_open_url", _opener(payload))
    assert load_text("tinyshakespeare", cache_dir=tmp_path)[0] == payload.decode()
    assert (tmp_path / "tinyshakespeare.txt").read_bytes() == payload


def test_the_real_tinyshakespeare_matches_the_pinned_checksum(tmp_path, monkeypatch, tinyshakespeare):
    (tmp_path / "tinyshakespeare.txt").write_bytes(tinyshakespeare.read_bytes())
    monkeypatch.setattr(corpus_module, "_open_url", _opener(urllib.error.URLError("offline")))
    text, _ = load_text("tinyshakespeare", cache_dir=tmp_path)
    assert text.startswith("First Citizen:\n") and len(text) == 1_115_394


def test_default_cache_dir_follows_reslab_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("RESLAB_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "reslab"


# --------------------------------------------------------------------------------------------- a text file


def test_a_utf8_file_loads_as_is(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_bytes("\ufeffHello, wörld\nsecond line\n".encode())
    text, description = load_text(str(path))
    assert text == "Hello, wörld\nsecond line\n"  # the BOM is dropped, everything else kept
    assert str(path) in description


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.txt", None, "no such file"),
        ("folder", "dir", "is a directory"),
        ("empty.txt", b"", "is empty"),
        ("blank.txt", b" \n\n", "is empty"),
        ("data.bin", b"text\x00\x01\x02", "binary"),
        ("latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"), "not UTF-8"),
    ],
)
def test_bad_data_files_are_one_line_errors(tmp_path, name, content, expected):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ReslabError) as excinfo:
        load_text(str(path))
    message = one_line_error(excinfo)
    assert expected in message and str(path) in message


# -------------------------------------------------------------------------------------------------- tokenizers

SAMPLE = "First Citizen:\nBefore we proceed, hear me speak.\n\nAll:\nSpeak, speak.\n  indented\tand tabbed  \n\n\n"


def test_char_tokenizer_vocabulary_is_the_sorted_characters():
    tok = build_tokenizer("char", SAMPLE)
    assert tok.kind == "char"
    assert tok.chars == "".join(sorted(set(SAMPLE)))
    assert tok.vocab_size == len(set(SAMPLE))
    ids = tok.encode(SAMPLE)
    assert ids == [tok.chars.index(c) for c in SAMPLE]
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(torch.tensor(ids)) == SAMPLE


def test_char_tokenizer_names_an_unknown_character():
    tok = build_tokenizer("char", "abc")
    with pytest.raises(ReslabError) as excinfo:
        tok.encode("abcz")
    assert "'z'" in one_line_error(excinfo)
    with pytest.raises(ReslabError):
        tok.decode([0, 3])


def test_char_encoding_a_megabyte_is_fast():
    rng = np.random.default_rng(0)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz ABCDEFG,.;:!?\n'é"))
    text = "".join(rng.choice(alphabet, size=1_000_000).tolist())
    tok = build_tokenizer("char", text)
    start = time.perf_counter()
    tokens = encode_corpus(tok, text)
    assert time.perf_counter() - start < 0.5
    assert tokens.dtype == torch.int64 and tokens.shape == (1_000_000,)
    assert tok.decode(tokens[:1000].tolist()) == text[:1000]


BPE_TEXT = (SAMPLE * 40) + "Unicode too: café, naïve, 日本語, emoji 🙂.\n" + "What shouts are these?\n" * 30


def test_bpe_round_trips_exactly_and_respects_vocab_size():
    tok = build_tokenizer("bpe", BPE_TEXT, vocab_size=300)
    assert tok.kind == "bpe"
    assert 256 < tok.vocab_size <= 300
    ids = tok.encode(BPE_TEXT)
    assert len(ids) < len(BPE_TEXT.encode())  # merges were learned
    assert max(ids) < tok.vocab_size
    assert tok.decode(ids) == BPE_TEXT


def test_bpe_training_is_deterministic():
    first = build_tokenizer("bpe", BPE_TEXT, vocab_size=300)
    second = build_tokenizer("bpe", BPE_TEXT, vocab_size=300)
    assert first.to_json() == second.to_json()


def test_bpe_pieces_encode_like_the_whole_text(monkeypatch):
    tok = build_tokenizer("bpe", BPE_TEXT, vocab_size=300)
    tricky = BPE_TEXT + "a\n\n\nb\n c\n\tD\nx's\n'tis\n12\n34\n" * 20
    monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", 7)
    assert len(tokenizer_module._pieces(tricky)) > 100
    assert tok.encode(tricky) == tok._hf.encode(tricky).ids


def test_bpe_vocab_size_below_the_byte_alphabet_is_refused():
    with pytest.raises(ReslabError) as excinfo:
        build_tokenizer("bpe", BPE_TEXT, vocab_size=100)
    assert "--vocab-size" in one_line_error(excinfo)


def test_unknown_tokenizer_kind():
    with pytest.raises(ReslabError) as excinfo:
        build_tokenizer("wordpiece", "text")
    assert "char" in one_line_error(excinfo)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_saved_tokenizer_loads_back_exactly(tmp_path, kind):
    tok = build_tokenizer(kind, BPE_TEXT, vocab_size=300)
    tok.save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.reslab.json"]
    record = json.loads((tmp_path / "tokenizer.reslab.json").read_text())
    assert record["kind"] == kind
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
    ids = tok.encode(BPE_TEXT)
    assert loaded.encode(BPE_TEXT) == ids
    assert loaded.decode(ids) == BPE_TEXT


def test_loading_a_missing_or_damaged_tokenizer(tmp_path):
    with pytest.raises(ReslabError) as excinfo:
        load_tokenizer(tmp_path)
    assert "tokenizer.json" in one_line_error(excinfo)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ReslabError):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"kind": "bpe", "format": 1, "hf_tokenizer": {"x": 1}}))
    with pytest.raises(ReslabError):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------- splits and batches


def test_split_is_positional_ninety_ten():
    tokens = torch.arange(1000)
    train, val = split_tokens(tokens)
    assert torch.equal(train, torch.arange(900)) and torch.equal(val, torch.arange(900, 1000))
    with pytest.raises(ReslabError):
        split_tokens(tokens, 1.0)


def test_check_length_tells_the_user_what_to_change():
    check_length(torch.arange(9), 8, "val")
    with pytest.raises(ReslabError) as excinfo:
        check_length(torch.arange(8), 8, "val")
    message = one_line_error(excinfo)
    assert "val" in message and "--context" in message and "more text" in message


def test_sampler_shapes_and_shift():
    sampler = BatchSampler(torch.arange(500), batch_size=16, context=32, generator=torch.Generator().manual_seed(0))
    x, y = sampler.sample()
    assert x.shape == y.shape == (16, 32)
    assert x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(y, x + 1)  # the tokens are their own positions, so y is x shifted by one
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)


def test_sampler_is_deterministic_for_a_seed():
    tokens = torch.randint(0, 65, (2000,), generator=torch.Generator().manual_seed(1))

    def batches(seed):
        sampler = BatchSampler(tokens, 8, 16, torch.Generator().manual_seed(seed))
        return [sampler.sample() for _ in range(5)]

    same, again, other = batches(3), batches(3), batches(4)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(same, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(same, other))


def test_sampler_offsets_cover_the_range_without_crossing_the_end():
    n, context = 50, 8
    sampler = BatchSampler(torch.arange(n), batch_size=64, context=context, generator=torch.Generator().manual_seed(0))
    starts, last = set(), 0
    for _ in range(100):
        x, y = sampler.sample()
        starts.update(x[:, 0].tolist())
        last = max(last, int(y.max()))
    assert starts == set(range(n - context))
    assert last == n - 1


def test_sampler_refuses_too_few_tokens():
    with pytest.raises(ReslabError) as excinfo:
        BatchSampler(torch.arange(8), 2, 8, torch.Generator())
    assert "--context" in one_line_error(excinfo)


def test_real_tinyshakespeare(tinyshakespeare):
    text, _ = load_text(str(tinyshakespeare))
    tok = build_tokenizer("char", text)
    assert tok.vocab_size == 65
    tokens = encode_corpus(tok, text)
    train, val = split_tokens(tokens)
    assert (len(train), len(val)) == (1_003_854, 111_540)
    check_length(val, 256, "val")
    x, y = BatchSampler(train, 4, 64, torch.Generator().manual_seed(0)).sample()
    assert tok.decode(x[0].tolist())[1:] == tok.decode(y[0].tolist())[:-1]
    assert isinstance(tok, CharTokenizer)
