"""From text to training batches: encode once, split by position, sample random windows.

The split is positional (first 90% train, last 10% val) rather than shuffled, so validation text is text the
model has never seen a neighbour of. Batches are windows at random offsets, drawn from a caller-owned
`torch.Generator` so a seeded run sees the same batches.
"""

from __future__ import annotations

import numpy as np
import torch

from reslab.data.shards import TokenSpan
from reslab.data.tokenizer import Tokenizer
from reslab.errors import ReslabError, check_positive


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
