"""From text to training batches: encode once, split by position, sample random windows.

The split is positional (first 90% train, last 10% val) rather than shuffled, so validation text is text the
model has never seen a neighbour of. Batches are windows at random offsets, drawn from a caller-owned
`torch.Generator` so a seeded run sees the same batches.
"""

from __future__ import annotations

import torch

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


def check_length(tokens: torch.Tensor, context: int, split_name: str) -> None:
    """One window needs context + 1 tokens (inputs plus the shifted targets); say so before training starts."""
    if len(tokens) < context + 1:
        raise ReslabError(
            f"the {split_name} split has {len(tokens):,} tokens but --context {context} needs at least "
            f"{context + 1:,}; lower --context or use more text"
        )


class BatchSampler:
    """Random (x, y) windows from one token sequence; y is x shifted left by one token.

    Offsets are uniform over every start whose window fits, [0, len(tokens) - context - 1], so the last
    token is a target of some window and no window runs past the end. Tokens are moved to `device` once; each
    batch is one gather, with no Python loop over rows or tokens.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        batch_size: int,
        context: int,
        generator: torch.Generator,
        device: str | torch.device = "cpu",
        split_name: str = "data",
    ):
        check_positive(batch_size=batch_size, context=context)
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        check_length(tokens, context, split_name)
        self.batch_size = batch_size
        self.context = context
        self.generator = generator
        self.device = torch.device(device)
        self.tokens = tokens.to(device=self.device, dtype=torch.long)
        self.num_offsets = len(tokens) - context  # offsets 0 .. num_offsets - 1
        self._window = torch.arange(context, device=self.device)

    def offsets(self) -> torch.Tensor:
        """The next batch's window starts, drawn on the generator's device so its seed alone fixes them."""
        starts = torch.randint(
            self.num_offsets, (self.batch_size,), generator=self.generator, device=self.generator.device
        )
        return starts.to(self.device)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x and y, each (batch_size, context) int64 on `device`, both contiguous."""
        index = self.offsets()[:, None] + self._window  # (batch, context)
        return self.tokens[index], self.tokens[index + 1]
