"""The data layer: corpora, tokenizers, and random training batches.

    text, description = load_text("shakespeare")          # or "tinyshakespeare", or a path
    tokenizer = build_tokenizer("char", text)              # or "bpe" with vocab_size
    train, val = split_tokens(encode_corpus(tokenizer, text))
    x, y = BatchSampler(train, batch_size, context, generator).sample()
"""

from reslab.data.batches import BatchSampler, check_length, encode_corpus, split_tokens
from reslab.data.corpus import default_cache_dir, load_text
from reslab.data.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
)

__all__ = [
    "BPETokenizer",
    "BatchSampler",
    "CharTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "check_length",
    "default_cache_dir",
    "encode_corpus",
    "load_text",
    "load_tokenizer",
    "split_tokens",
]
