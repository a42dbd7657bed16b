"""The data layer: corpora, tokenizers, token shards on disk, and random training batches.

    text, description = load_text("shakespeare")          # or "tinyshakespeare", or a path
    tokenizer = build_tokenizer("char", text)              # or "bpe" with vocab_size
    train, val = split_tokens(encode_corpus(tokenizer, text))
    x, y = BatchSampler(train, batch_size, context, generator).sample()

At scale, tokenize once and read memory-mapped shards (`reslab data prepare`):

    prepare_data(["corpus/"], Path("data/corpus"), PrepareOptions(tokenizer="bpe", vocab_size=4096, workers=8))
    data = open_prepared(Path("data/corpus"))              # also nanoGPT train.bin/val.bin, modded-nanogpt shards
    x, y = BatchSampler(data.train, batch_size, context, generator).sample()
"""

from reslab.data.batches import BatchSampler, check_length, encode_corpus, split_tokens
from reslab.data.corpus import default_cache_dir, load_text
from reslab.data.prepare import PrepareOptions, prepare_data
from reslab.data.shards import PreparedData, TokenSpan, open_prepared
from reslab.data.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
)
from reslab.data.training import training_data

__all__ = [
    "BPETokenizer",
    "BatchSampler",
    "CharTokenizer",
    "PrepareOptions",
    "PreparedData",
    "TokenSpan",
    "Tokenizer",
    "build_tokenizer",
    "check_length",
    "default_cache_dir",
    "encode_corpus",
    "load_text",
    "load_tokenizer",
    "open_prepared",
    "prepare_data",
    "split_tokens",
    "training_data",
]
