"""The decomposition's result type: the final stream split into components and each one's direct logit attribution.

Its own module, so that both decompositions, of a reslab model at its residual sites (`decompose.py`) and of any
model from its traced graph (`dla_traced.py`), build it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Decomposition:
    """The final stream of one batch split into components (the embedding, then each sublayer's write)."""

    names: list[str]
    writes: torch.Tensor  # (components, batch, seq, width): e, w_1, ..., w_n
    contributions: torch.Tensor  # (components, batch, positions): direct logit contribution to the target token
    bias: torch.Tensor  # (batch, positions): W_y . b + bias_y, the final norm's and the head's biases
    target_logit: torch.Tensor  # (batch, positions): the model's own logit of the target token
    stream_error: float  # max |x_L - sum of the components|
    norm: str  # the final norm: layernorm, rmsnorm or none
    coefficients: list[float] | None = None  # mean coefficient a of each component, where they are not all 1
    entries: list[str] | None = None  # traced models: the lens entry (block) each component is written in

    @property
    def sum_error(self) -> float:
        """max |sum of contributions + bias - the model's logit|: 0 up to float rounding."""
        return (self.contributions.sum(0) + self.bias - self.target_logit).abs().max().item()

    def mean_contributions(self) -> list[float]:
        return self.contributions.flatten(1).mean(1).tolist()

    def by_entry(self, entries: list[str]) -> list[float]:
        """The mean contribution written in each lens entry (the sum of the components of that block, traced
        models), in the order of `entries`; one per component where components are the entries."""
        means = self.mean_contributions()
        if self.entries is None:
            return means
        return [sum(m for m, entry in zip(means, self.entries) if entry == name) for name in entries]

    def to_dict(self) -> dict[str, Any]:
        extra = {} if self.coefficients is None else {"coefficients": dict(zip(self.names, self.coefficients))}
        if self.entries is not None:
            extra["entries"] = dict(zip(self.names, self.entries))
        return {**extra, "norm": self.norm, "components": dict(zip(self.names, self.mean_contributions())),
                "bias": self.bias.mean().item(), "target_logit": self.target_logit.mean().item(),
                "sum_error": self.sum_error, "stream_error": self.stream_error}
