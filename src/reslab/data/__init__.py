"""The data layer: corpora, tokenizers, token shards on disk, and random training batches.

    text, description = load_text("shakespeare")          # or "tinyshakespeare", or a path
    tokenizer = build_tokenizer("char", text)              # or "bpe" with vocab_size
    train, val = split_tokens(encode_corpus(tokenizer, text))
    x, y = BatchSampler(train, batch_size, context, generator).sample()

At scale, tokenize once and read memory-mapped shards (`reslab data prepare`):

    prepare_data(["corpus/"], Path("data/corpus"), PrepareOptions(tokenizer="bpe", vocab_size=4096, workers=8))
    data = open_prepared(Path("data/corpus"))              # also nanoGPT train.bin/val.bin, modded-nanogpt shards
    x, y = BatchSampler(data.train, batch_size, context, generator).sample()

The names below load on first use (PEP 562): `reslab data prepare` and its worker processes import numpy, not torch
(a second of start-up each).
"""

from reslab.registry import lazy_names

_LAZY = {
    "BatchSampler": ".training", "check_length": ".training", "encode_corpus": ".training", "split_tokens": ".training",
    "default_cache_dir": ".sources", "load_text": ".sources",
    "PrepareOptions": ".prepare", "prepare_data": ".prepare",
    "PreparedData": ".shards", "TokenSpan": ".shards", "open_prepared": ".shards",
    "BPETokenizer": ".tokenizer", "CharTokenizer": ".tokenizer", "Tokenizer": ".tokenizer",
    "build_tokenizer": ".tokenizer", "load_tokenizer": ".tokenizer",
    "training_data": ".training",
}
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_names(__name__, _LAZY)
