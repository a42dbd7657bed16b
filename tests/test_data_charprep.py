"""The char tokenizer's fast prepare (workers on byte ranges) gives exactly the tokens of encoding the text in memory:
ASCII and non-ASCII blocks, characters cut by a block boundary, a BOM, several files, one worker or two."""

from __future__ import annotations

import numpy as np
import pytest

import reslab.data.charprep
import reslab.data.prepare
from reslab.data import build_tokenizer, encode_corpus, open_prepared
from reslab.data.prepare import PrepareOptions, prepare_data


@pytest.mark.parametrize("workers", [1, 2])
def test_char_shards_equal_the_text_encoded_in_memory(tmp_path, monkeypatch, workers):
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(reslab.data.charprep, "BLOCK_BYTES", 1000)  # many blocks; boundaries inside characters
    monkeypatch.setattr(reslab.data.prepare, "PARALLEL_BYTES", 1)
    rng = np.random.default_rng(0)
    words = ["king", "queen", "lörd", "✓", "🙂", "naïve", "\n", " ", "thou"]
    texts = ["".join(rng.choice(words, 3000)), "plain ascii only\n" * 400, "".join(rng.choice(words, 1500))]
    paths = []
    for index, text in enumerate(texts):
        paths.append(tmp_path / f"part{index}.txt")
        paths[-1].write_bytes(("\ufeff" if index == 2 else "").encode() + text.encode("utf-8"))  # a BOM on one
    whole = "".join(texts)
    manifest = prepare_data(paths, tmp_path / "out", PrepareOptions(tokenizer="char", shard_tokens=777,
                                                                     workers=workers))
    data = open_prepared(tmp_path / "out")
    expected = encode_corpus(build_tokenizer("char", whole), whole).numpy()
    assert data.tokenizer.to_bytes() == build_tokenizer("char", whole).to_bytes()
    assert np.array_equal(np.concatenate([data.train.to_numpy(), data.val.to_numpy()]), expected)
    assert manifest["characters"] == len(whole) and all(s["tokens"] == 777 for s in manifest["shards"][:-1])
    assert len(manifest["shards"]) == -(-len(whole) // 777)


@pytest.mark.parametrize("shift", range(4))
def test_a_block_boundary_at_every_byte_of_a_four_byte_character(tmp_path, monkeypatch, shift):
    """A boundary after the first, second, third or fourth byte of an emoji: never a 'not UTF-8' error, same tokens."""
    monkeypatch.setattr(reslab.data.charprep, "BLOCK_BYTES", 16)
    monkeypatch.setattr(reslab.data.prepare, "PARALLEL_BYTES", 1)
    text = "a" * (12 + shift) + "😀" + "b" * 40 + "\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    prepare_data([tmp_path / "t.txt"], tmp_path / "out", PrepareOptions(tokenizer="char", workers=1))
    data = open_prepared(tmp_path / "out")
    expected = encode_corpus(build_tokenizer("char", text), text).numpy()
    assert np.array_equal(np.concatenate([data.train.to_numpy(), data.val.to_numpy()]), expected)
