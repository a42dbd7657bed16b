"""The data a training run reads: opened once (`training_data`), then drawn as batches (`BatchSampler`).

## Opening the data

Any `--data` value opened as memory-mapped token spans:

    data = training_data("corpus.txt", "char", None)     # a text file: prepared into the cache once
    data = training_data("data/owt", "char", None)       # a prepared directory (reslab, nanoGPT or modded-nanogpt)
    data.tokenizer, data.train, data.val, data.record    # record: what config.json keeps about the data

A text source (`shakespeare`, `tinyshakespeare` or a file) is tokenized once into the cache (`cached_text`) and read
from there, with the same tokens and the same 90/10 split as `split_tokens(encode_corpus(...))` in memory.

## Batches

From text to training batches: encode once, split by position, sample random windows.

The split is positional (first 90% train, last 10% val) rather than shuffled, so validation text is text the
model has never seen a neighbour of. Batches are windows at random offsets, drawn from a caller-owned
`torch.Generator` so a seeded run sees the same batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from reslab.checks import check_positive
from reslab.data.prepare import cached_text
from reslab.data.shards import (
    PreparedData,
    TokenSpan,
    check_unchanged,
    check_vocab_flag,
    open_prepared,
    open_reslab,
    read_manifest,
)
from reslab.data.sources import NAMED_SOURCES, text_file
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


def encode_corpus(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D int64 tensor of token ids (int64 because that is what embeddings index with)."""
    return torch.from_numpy(tokenizer.encode_array(text))


def split_tokens(tokens: torch.Tensor, train_fraction: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val): the first `train_fraction` of the tokens, then the rest. Views, not copies."""
    if not 0.0 < train_fraction < 1.0:
        raise ReslabError(f"train fraction must be between 0 and 1 (exclusive), got {train_fraction}")
    n_train = int(len(tokens) * train_fraction)
    return tokens[:n_train], tokens[n_train:]


def check_length(tokens: torch.Tensor | TokenSpan, context: int, split_name: str) -> None:
    """One window needs context + 1 tokens (inputs plus the shifted targets); say so before training starts."""
    if len(tokens) < context + 1:
        raise ReslabError(
            f"the {split_name} split has {len(tokens):,} tokens but --context {context} needs at least "
            f"{context + 1:,}; lower --context or use more text"
        )


class BatchSampler:
    """Random (x, y) windows from one token sequence; y is x shifted left by one token.

    Offsets are uniform over every start whose window fits, [0, len(tokens) - context - 1], so the last
    token is a target of some window and no window runs past the end. `tokens` is a tensor (moved to `device`
    once; each batch is one gather) or a `TokenSpan` of memory-mapped shards (each batch's windows are read and
    converted to int64, nothing else). Both draw the same offsets from the generator, so the same tokens give the
    same batches either way.
    """

    def __init__(
        self,
        tokens: torch.Tensor | TokenSpan,
        batch_size: int,
        context: int,
        generator: torch.Generator,
        device: str | torch.device = "cpu",
        split_name: str = "data",
        vocab_size: int | None = None,
    ):
        check_positive(batch_size=batch_size, context=context)
        if isinstance(tokens, torch.Tensor) and tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        check_length(tokens, context, split_name)
        self.batch_size = batch_size
        self.context = context
        self.generator = generator
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.span = None if isinstance(tokens, torch.Tensor) else tokens
        if self.span is None:
            self.tokens = tokens.to(device=self.device, dtype=torch.long)
            self._window = torch.arange(context, device=self.device)
        self.num_offsets = len(tokens) - context  # offsets 0 .. num_offsets - 1

    def offsets(self) -> torch.Tensor:
        """The next batch's window starts, drawn on the generator's device so its seed alone fixes them."""
        starts = torch.randint(
            self.num_offsets, (self.batch_size,), generator=self.generator, device=self.generator.device
        )
        return starts.to(self.device) if self.span is None else starts

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x and y, each (batch_size, context) int64 on `device`, both contiguous."""
        if self.span is not None:
            return self._sample_span()
        index = self.offsets()[:, None] + self._window  # (batch, context)
        return self.tokens[index], self.tokens[index + 1]

    def _sample_span(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One gather in the shards' dtype, then x and y each converted to int64 in one copy (no int64 rows first)."""
        rows = self.span.gather(self.offsets().numpy(), self.context + 1)
        if self.vocab_size is not None and int(rows.max()) >= self.vocab_size:
            raise ReslabError(f"the data holds token id {int(rows.max())}, above the vocabulary of "
                              f"{self.vocab_size}; prepare the data again with one tokenizer")
        x = torch.from_numpy(rows[:, :-1].astype(np.int64))
        y = torch.from_numpy(rows[:, 1:].astype(np.int64))
        return x.to(self.device), y.to(self.device)
