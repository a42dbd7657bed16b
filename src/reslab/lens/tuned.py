"""The tuned lens (Belrose et al. 2023, Eliciting Latent Predictions from Transformers with the Tuned Lens,
arXiv 2303.08112): one learned affine translator per lens entry, `h -> h + A_l h + b_l` (A_l, b_l zero at init, so an
untrained tuned lens is the logit lens), fitted with the model frozen to minimise KL(final || tuned) on training
text, then decoded like the logit lens by the model's own final norm and head.

Every entry but the last (the model's output) gets a translator; the stream is first reduced by the model's stream
adapter, as in the logit lens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.errors import ReslabError
from reslab.lens.capture import capture_forward


class TunedLens(nn.Module):
    """Affine translators for the first `entries` lens entries of a model of `width`."""

    def __init__(self, width: int, entries: int):
        super().__init__()
        self.translators = nn.ModuleList(nn.Linear(width, width) for _ in range(entries))
        for translator in self.translators:
            nn.init.zeros_(translator.weight)
            nn.init.zeros_(translator.bias)

    def forward(self, entry: int, stream: torch.Tensor) -> torch.Tensor:
        """The translated stream of entry `entry`; the last entry (past the translators) is left as it is."""
        if entry >= len(self.translators):
            return stream
        return stream + self.translators[entry](stream)


def reduced_streams(model: nn.Module, tokens: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(each entry's stream reduced to (batch, seq, width), the output's log-probabilities), no gradient."""
    capture, output = capture_forward(model, tokens)
    with torch.no_grad():
        streams = [model.stream.reduce(stream).detach() for stream in capture.streams]
    return streams, F.log_softmax(output.float(), dim=-1)


def tuned_kl(model: nn.Module, tuned: TunedLens, streams: list[torch.Tensor], final_logp: torch.Tensor) -> torch.Tensor:
    """Sum over translated entries of the mean KL(final || tuned) per token."""
    total = final_logp.new_zeros(())
    for entry, stream in enumerate(streams[:len(tuned.translators)]):
        logp = F.log_softmax(model.head(model.norm(tuned(entry, stream))).float(), dim=-1)
        total = total + F.kl_div(logp.flatten(0, 1), final_logp.flatten(0, 1), log_target=True, reduction="batchmean")
    return total


def fit_tuned_lens(model: nn.Module, batches: Callable[[], torch.Tensor], steps: int, lr: float = 1e-3,
                   seed: int = 0) -> tuple[TunedLens, list[float]]:
    """Fit a tuned lens for `model` (frozen) on `steps` batches from `batches()` (token ids (batch, seq));
    returns the lens and its loss (summed KL over entries) at each step."""
    if steps < 1:
        raise ReslabError(f"the tuned lens needs at least 1 step, got {steps}")
    torch.manual_seed(seed)
    width = model.head.weight.shape[1]  # the width the head reads
    entries = sum(1 for _ in model.residual_sites())  # every entry but the output: embedding + all but the last
    device = next(model.parameters()).device
    tuned = TunedLens(width, entries).to(device)
    optimizer = torch.optim.Adam(tuned.parameters(), lr=lr)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    losses = []
    try:
        for _ in range(steps):
            streams, final_logp = reduced_streams(model, batches().to(device))
            loss = tuned_kl(model, tuned, streams, final_logp)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return tuned.eval(), losses
