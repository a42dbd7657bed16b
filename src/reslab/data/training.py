"""The data a training run reads: any `--data` value opened as memory-mapped token spans.

    data = training_data("corpus.txt", "char", None)     # a text file: prepared into the cache once
    data = training_data("data/owt", "char", None)       # a prepared directory (reslab, nanoGPT or modded-nanogpt)
    data.tokenizer, data.train, data.val, data.record    # record: what config.json keeps about the data

A text source (`shakespeare`, `tinyshakespeare` or a file) is tokenized once into the cache (`cached_text`) and read
from there, with the same tokens and the same 90/10 split as `split_tokens(encode_corpus(...))` in memory.
"""

from __future__ import annotations

from pathlib import Path

from reslab.data.corpus import NAMED_SOURCES, text_file
from reslab.data.prepare import cached_text
from reslab.data.shards import (
    PreparedData,
    check_unchanged,
    check_vocab_flag,
    open_prepared,
    open_reslab,
    read_manifest,
)
from reslab.data.tokenizer import Tokenizer, check_bpe_settings
from reslab.errors import ReslabError


def training_data(source: str | None, kind: str, vocab_size: int | None,
                  expect_sha256: str | None = None) -> PreparedData:
    """Open `source` for training; expect_sha256 (a resumed run's record) refuses changed text before preparing."""
    if source not in NAMED_SOURCES and source is not None and Path(source).is_dir():
        if kind != "char":  # char is the default: the only value that cannot tell whether --tokenizer was given
            raise ReslabError(f"--tokenizer {kind} does not apply to --data {source}: a prepared directory brings its "
                              "own tokenizer; drop --tokenizer (or give the text, to tokenize it anew)")
        check_vocab_flag(Path(source), vocab_size)
        return open_prepared(Path(source), vocab_size)
    check_bpe_settings(kind, vocab_size=vocab_size)
    path, label = text_file(source)
    directory, sha = cached_text(path, kind, vocab_size, expect_sha256)
    data = open_reslab(directory)
    characters = read_manifest(directory).get("characters", 0)
    data.record.update({"source": source, "description": f"{label} {characters:,} characters", "sha256": sha,
                        "prepared": str(directory)})
    return data


def check_resumable(data: PreparedData, run_tokenizer: Tokenizer, saved: dict, run_path: Path, source: str) -> None:
    """A resumed run reads the data it started with: the same tokenizer, the same manifest, the same shard bytes."""
    if data.tokenizer.to_bytes() != run_tokenizer.to_bytes():
        raise ReslabError(f"--data {source} was prepared with another tokenizer ({data.tokenizer!r}) than run "
                          f"{run_path} ({run_tokenizer!r}); resume with the data the run started with")
    if data.record["sha256"] != saved.get("sha256"):
        raise ReslabError(f"the data {source!r} changed since run {run_path} started (fingerprint "
                          f"{data.record['sha256'][:12]}, was {str(saved.get('sha256'))[:12]}); resume with the same "
                          "data or start a new run")
    check_unchanged(data, saved.get("shard_stats"), f"changed since run {run_path} started; put the shard back as "
                    "it was prepared (reslab data info DIR --verify checks), or start a new run")
