"""The tiktoken fast path of byte-level BPE encoding gives exactly HF `tokenizers`' ids, or is not used."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from reslab.data.fast_bpe import fast_encoder
from reslab.data.tokenizer import BPETokenizer, load_tokenizer_file

pytest.importorskip("tiktoken", reason="the fast path needs the `fastbpe` extra (tiktoken)")

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
WHITESPACE = "\t\n\x0b\x0c\r \x1c\x1d\x1e\x1f\x85\xa0\u1680\u180e\u2000\u2005\u200a\u200b\u2028\u2029\u202f\u205f\u3000"
TRICKY = (
    "I'm sure it's theirs; they'll've said 'twas HE'S, don't you'D?  \n\n\n   \t\t  x  \r\n\r\n"
    "Prices: 3.14159, 1,000,000 and ١٢٣ (arabic) ²³ ½ Ⅻ 42nd 007\n"
    "naïve café Zürich — “quotes” «guillemets» ĳ ﬁ e\u0301 Ωμέγα русский 日本語のテキスト 한국어 עברית\n"
    "emoji 😀👍🏽👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖🤖🤖\n"
    + "".join(f"a{space}b{space}{space}c{space}\n" for space in WHITESPACE)
    + "trailing spaces    \n    leading, and      " + WHITESPACE * 3
)


def hf_ids(tokenizer: BPETokenizer, text: str) -> list[int]:
    """HF `tokenizers`' own ids for `text`, from the JSON the reslab tokenizer saves (no reslab code involved)."""
    return HFTokenizer.from_str(json.dumps(tokenizer.to_json()["hf_tokenizer"])).encode(text).ids


def random_unicode(seed: int, length: int) -> str:
    """Text drawn from many scripts, symbols, digits and spaces (no surrogates)."""
    rng = np.random.default_rng(seed)
    ranges = [(0x20, 0x7F), (0xA0, 0x2FF), (0x370, 0x52F), (0x600, 0x6FF), (0x2000, 0x206F), (0x3000, 0x30FF),
              (0x4E00, 0x4E80), (0xAC00, 0xAC80), (0x1F300, 0x1F6FF), (0x1F900, 0x1F9FF)]
    picks = rng.integers(0, len(ranges), length)
    chars = [chr(int(rng.integers(*ranges[p]))) for p in picks]
    chars = [c if rng.random() > 0.1 else WHITESPACE[int(rng.integers(len(WHITESPACE)))] for c in chars]
    return "".join(chars)


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.mark.parametrize("vocab_size", [300, 2048])
def test_trained_tokenizer_takes_the_fast_path_with_identical_ids(shakespeare, vocab_size):
    tokenizer = BPETokenizer.train(shakespeare[:300_000] + TRICKY * 20 + random_unicode(0, 20_000), vocab_size)
    assert fast_encoder(tokenizer._hf) is not None
    for text in [shakespeare, TRICKY, random_unicode(1, 30_000), "", " ", "\n", "'s", "🤖"]:
        ids = tokenizer.encode_array(text)
        assert ids.dtype == np.int64
        assert ids.tolist() == hf_ids(tokenizer, text)
        assert tokenizer.decode(ids) == text


def test_saved_and_loaded_tokenizer_keeps_exact_ids(shakespeare, tmp_path):
    tokenizer = BPETokenizer.train(shakespeare[:200_000], 512)
    tokenizer.save(tmp_path)
    loaded = load_tokenizer_file(tmp_path / "tokenizer.reslab.json")
    text = shakespeare[-50_000:] + TRICKY
    assert loaded.encode_array(text).tolist() == hf_ids(tokenizer, text)


def gpt2_style_file(tokenizer: BPETokenizer, path: Path) -> Path:
    """A Hugging Face tokenizer.json laid out like GPT-2's: merges as "a b" strings, an <|endoftext|> added token
    after the merges, a ByteLevel post-processor."""
    record = tokenizer.to_json()["hf_tokenizer"]
    model = record["model"]
    model["merges"] = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    eot = len(model["vocab"])
    model["vocab"]["<|endoftext|>"] = eot
    record["added_tokens"] = [{"id": eot, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True}]
    record["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                "use_regex": True}
    path.write_text(json.dumps(record), encoding="utf-8")
    return path


def test_gpt2_style_file_with_a_special_token(shakespeare, tmp_path):
    path = gpt2_style_file(BPETokenizer.train(shakespeare[:200_000], 700), tmp_path / "tokenizer.json")
    loaded = load_tokenizer_file(path)
    assert fast_encoder(loaded._hf) is not None
    text = shakespeare[:20_000] + "<|endoftext|>" + TRICKY + "<|endoftext|><|endoftext|> x<|endoftext|>y"
    ids = loaded.encode_array(text).tolist()
    assert ids == HFTokenizer.from_file(str(path)).encode(text).ids
    assert ids.count(loaded.vocab_size - 1) == 4


def hand_made(vocab: dict[str, int], merges: list[tuple[str, str]]) -> BPETokenizer:
    """A byte-level HF BPE built from an explicit vocabulary and merges (all 256 byte tokens are added first)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    full = {char: i for i, char in enumerate(sorted(alphabet))}
    full.update({token: 256 + i for token, i in vocab.items()})
    hf = HFTokenizer(models.BPE(full, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return BPETokenizer(hf)


def test_ids_out_of_merge_order_are_refused_and_hf_is_used():
    # merges ("t","h") then ("th","e") then ("e","r"), but "the" has a lower id than "th": priority != id order
    tokenizer = hand_made({"the": 0, "th": 1, "er": 2}, [("t", "h"), ("th", "e"), ("e", "r")])
    assert fast_encoder(tokenizer._hf) is None
    text = "the other there, theatre " * 3
    assert tokenizer.encode_array(text).tolist() == hf_ids(tokenizer, text)


def test_a_token_no_merge_makes_is_refused():
    # "ab" is in the vocabulary but no merge makes it: HF never outputs it, tiktoken would take "ab" whole
    tokenizer = hand_made({"bc": 0, "ab": 1}, [("b", "c")])
    assert fast_encoder(tokenizer._hf) is None
    assert tokenizer.encode_array("ab abc").tolist() == hf_ids(tokenizer, "ab abc")


def test_a_token_its_merges_do_not_rebuild_is_refused():
    # ids in merge order, but "abc" = ("ab","c") while ("b","c") merges first: HF encodes "abc" and "abcd" with
    # "a","bc"; tiktoken would join "a"+"bc" (their bytes are the token "abc") and take the pre-token "abc" whole
    tokenizer = hand_made({"bc": 0, "ab": 1, "abc": 2}, [("b", "c"), ("a", "b"), ("ab", "c")])
    assert fast_encoder(tokenizer._hf) is None
    assert tokenizer.encode_array("abc abcd").tolist() == hf_ids(tokenizer, "abc abcd")
    assert tokenizer.decode(tokenizer.encode_array("abcd")) == "abcd"


def test_prefix_space_is_refused(shakespeare):
    tokenizer = BPETokenizer.train(shakespeare[:100_000], 300)
    tokenizer._hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert fast_encoder(tokenizer._hf) is None
    assert tokenizer.encode_array("First Citizen").tolist() == hf_ids(tokenizer, "First Citizen")


def test_without_tiktoken_hf_encodes_silently(shakespeare, monkeypatch):
    tokenizer = BPETokenizer.train(shakespeare[:100_000], 300)
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken now raises ImportError
    assert fast_encoder(tokenizer._hf) is None
    assert tokenizer.encode_array(TRICKY).tolist() == hf_ids(tokenizer, TRICKY)
    assert tokenizer._fast is None


def test_pickled_and_copied_tokenizers_encode_the_same(shakespeare):
    """Workers receive the tokenizer pickled; a copy made before or after the first encode finds its own encoder."""
    import copy
    import pickle

    tokenizer = BPETokenizer.train(shakespeare[:100_000], 400)
    text = shakespeare[:5000] + TRICKY
    copies = [pickle.loads(pickle.dumps(tokenizer)), copy.deepcopy(tokenizer)]
    expected = tokenizer.encode_array(text).tolist()
    copies += [pickle.loads(pickle.dumps(tokenizer)), copy.deepcopy(tokenizer)]
    assert all(c.encode_array(text).tolist() == expected == hf_ids(tokenizer, text) for c in copies)


def test_a_word_level_tokenizer_without_unknown_token_refuses_a_character_in_one_line(tmp_path):
    """A Hugging Face folder's tokenizer.json may be word level with no unknown token (a char tokenizer exported to
    HF is): a character outside its vocabulary is one ReslabError naming it and where it is, not the library's
    bare `Exception: WordLevel error: Missing [UNK] token`."""
    from reslab.errors import ReslabError

    hf = HFTokenizer(models.WordLevel({char: i for i, char in enumerate("abc xyz\n")}, unk_token=None))
    hf.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    loaded = load_tokenizer_file(path)
    assert loaded.encode("abc xyz") == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(ReslabError, match=r"character '€' \(U\+20AC, at offset 3\)"):
        loaded.encode("abc€€xyz")
