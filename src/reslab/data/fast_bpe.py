"""A faster encoder for reslab's byte-level BPE: the same tokenizer run by `tiktoken` (optional) instead of HF.

`tiktoken` encodes byte-level BPE several times faster than HF `tokenizers`, but it is a different algorithm: it
merges the adjacent pair whose *concatenated bytes* have the lowest id, and takes a pre-token whole when it is in
the vocabulary. HF merges the adjacent pair with the lowest *merge rank*. The two give the same ids when the HF
tokenizer is a plain GPT-2-style one (same pre-tokenizer, nothing added around the text), its ids follow merge
priority (every merge makes a new token, in merge order; no other token but added ones) and HF encodes every token
to itself (see `_tokens_encode_to_themselves` for why that suffices). `fast_encoder` checks all of that and returns
None otherwise (or when tiktoken is not installed): the caller then keeps HF, which is always right. The two regex
engines' reading of GPT-2's pattern (Unicode letters, digits, spaces) is checked by tests/test_data_bpe_fast.py.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

# The GPT-2 pre-tokenizer regex HF's ByteLevel pre-tokenizer applies (use_regex=True), in tiktoken's syntax.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, reversed: the alphabet HF ByteLevel tokens are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(code): b for b, code in chars.items()}


def fast_encoder(hf):
    """A `tiktoken.Encoding` that gives exactly the ids of the HF tokenizer `hf`, or None (no tiktoken, or a
    tokenizer it cannot reproduce)."""
    try:
        import tiktoken
    except ImportError:
        return None
    if not hasattr(tiktoken.Encoding, "encode_to_numpy"):  # before tiktoken 0.9 (its special tokens fixed in 0.11)
        return None
    record = json.loads(hf.to_str())
    ranks = _mergeable_ranks(record)
    specials = _special_tokens(record)
    if ranks is None or specials is None or not _plain_byte_level(record):
        return None
    if not _tokens_encode_to_themselves(hf, ranks):
        return None
    try:
        encoding = tiktoken.Encoding("reslab-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=specials)
    except Exception:  # tiktoken refuses tables it cannot use (duplicate ids): HF then
        return None
    return encoding


def _plain_byte_level(record: dict[str, Any]) -> bool:
    """Whether the text reaches the BPE model exactly as tiktoken sees it: no normalizer, GPT-2's regex, no prefix
    space, no template adding tokens, a BPE model without dropout, unknown token, affixes or fallbacks."""
    pre, post, model = record.get("pre_tokenizer"), record.get("post_processor"), record.get("model", {})
    return (
        record.get("normalizer") is None
        and isinstance(pre, dict) and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True) is True and pre.get("add_prefix_space") is False
        and (post is None or post.get("type") == "ByteLevel")
        and model.get("type") == "BPE"
        and not model.get("dropout") and model.get("unk_token") is None
        and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
        and not model.get("byte_fallback") and not model.get("ignore_merges")
    )


def _mergeable_ranks(record: dict[str, Any]) -> dict[bytes, int] | None:
    """tiktoken's {token bytes: id} for the HF model, or None when ids do not follow merge priority.

    Required: the 256 byte tokens are in the vocabulary; merge i makes a token not made before, with an id above
    merge i-1's; every other vocabulary entry is an added token (kept out of the ranks).
    """
    model = record.get("model", {})
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        return None
    to_byte = byte_decoder()
    if any(char not in vocab for char in to_byte):
        return None
    ranks = {bytes([to_byte[char]]): vocab[char] for char in to_byte}
    last = max(ranks.values())
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = left + right
        if token not in vocab or vocab[token] <= last or any(char not in to_byte for char in token):
            return None
        token_bytes = bytes(to_byte[char] for char in token)
        if token_bytes in ranks:
            return None
        ranks[token_bytes] = last = vocab[token]
    added = {token["content"] for token in record.get("added_tokens", [])}
    if set(vocab) - added - _names(ranks, to_byte):
        return None  # a token no merge makes: HF never outputs it, tiktoken would
    return ranks


def _names(ranks: dict[bytes, int], to_byte: dict[str, int]) -> set[str]:
    """The HF vocabulary names (byte-level strings) of the tokens in `ranks`."""
    to_char = {b: char for char, b in to_byte.items()}
    return {"".join(to_char[b] for b in token) for token in ranks}


def _tokens_encode_to_themselves(hf, ranks: dict[bytes, int]) -> bool:
    """Whether HF's own BPE turns each token's bytes back into that token (true of trained BPE; about 10 µs a token).

    This is what makes tiktoken exact (with ids in merge order): if tiktoken could join two adjacent tokens x, y
    into a token t although (x, y) is not a merge, HF encoding t alone would pass through [x, y] (HF's merges inside
    a span do not depend on what surrounds it as long as nothing crosses it) and could only reach [t] by merging
    x and y. So every join tiktoken can make is a merge, at the same priority, and both pick the same pair each
    step. It also covers tiktoken's shortcut of taking a pre-token found whole in the vocabulary.
    """
    to_char = {b: char for char, b in byte_decoder().items()}
    tokenize = hf.model.tokenize
    return all(len(token) < 2 or [t.id for t in tokenize("".join(map(to_char.__getitem__, token)))] == [rank]
               for token, rank in ranks.items())


def _special_tokens(record: dict[str, Any]) -> dict[str, int] | None:
    """HF's added tokens as tiktoken special tokens (HF splits them out of any text), or None when one has options
    tiktoken cannot reproduce (stripping spaces around it, whole words only, normalized matching)."""
    specials = {}
    for token in record.get("added_tokens", []):
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            return None
        if token.get("normalized") and record.get("normalizer") is not None:
            return None
        specials[token["content"]] = token["id"]
    if any(a != b and a in b for a in specials for b in specials):
        return None  # overlapping special tokens: HF and tiktoken may split them differently
    return specials
