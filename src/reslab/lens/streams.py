"""The lens per stream, for schemes that carry n parallel residual streams (hc, mhc, mhc-v4, mhc-lite, gated-hc, frac
with several streams): what each stream would predict on its own, and how much each site reads it.

For every entry l (the widened embedding, then each site's output) and every stream k, stream k alone is decoded
with the model's own final norm and head, `head(norm(H_l[k]))`, and scored as the logit lens scores the reduced
stream (loss on the next token, top-1 agreement and KL against the model's output). Where a site states its
connection weights (`connection_weights`: hc, mhc, mhc-v4, mhc-lite), `read` holds the mean weight with which the
site reads each stream into its sublayer (H_pre, averaged over tokens when it is computed per token). The reduced
stream the main table decodes is the model's own collapse (`model.stream.reduce`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from reslab.residual.multistream import ParallelStreams

STREAM_METRICS = ("loss", "agreement", "kl")


@dataclass
class StreamLens:
    """Per stream k and entry l: `loss[k][l]`, `agreement[k][l]`, `kl[k][l]`; `read[k][s]`: the mean weight site s
    reads stream k with (None where the scheme does not state its read weights)."""

    count: int
    loss: list[list[float]]
    agreement: list[list[float]]
    kl: list[list[float]]
    read: list[list[float]] | None

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "loss": self.loss, "top_1": self.agreement, "kl": self.kl, "read": self.read}

    def table(self, names: list[str]) -> str:
        """Per entry, each stream's loss (and the weight the next site reads it with, where stated)."""
        header = f"{'after':<10} " + " ".join(f"{f'loss s{k}':>9}" for k in range(self.count))
        if self.read is not None:
            header += "   " + " ".join(f"{f'read s{k}':>8}" for k in range(self.count))
        lines = [header, "-" * len(header)]
        for entry, name in enumerate(names):
            line = f"{name:<10} " + " ".join(f"{self.loss[k][entry]:>9.4f}" for k in range(self.count))
            if self.read is not None and entry < len(self.read[0]):  # the site this stream enters next
                line += "   " + " ".join(f"{self.read[k][entry]:>8.3f}" for k in range(self.count))
            lines.append(line)
        return "\n".join(lines)


def parallel_streams(model: nn.Module) -> int:
    """How many parallel streams the model carries (0 for one stream or a stream of another shape)."""
    adapter = getattr(model, "stream", None)
    return adapter.num_streams if isinstance(adapter, ParallelStreams) and adapter.num_streams > 1 else 0


def read_weights(sites: list[nn.Module], streams: list[torch.Tensor], count: int) -> list[list[float]] | None:
    """[stream][site]: the mean weight each site reads each stream with, from the stream entering it."""
    if not all(hasattr(site, "connection_weights") for site in sites):
        return None
    means = []
    for site, entering in zip(sites, streams):
        read = site.connection_weights(entering)[0].float()
        means.append(read.reshape(-1, count).mean(0).tolist())
    return [[site_means[k] for site_means in means] for k in range(count)]


def per_stream(model: nn.Module, capture, final_logp: torch.Tensor, targets: torch.Tensor,
               positions: int, score) -> StreamLens | None:
    """The per-stream lens of a captured forward (None for a model with one stream); `score(logits, final_logp,
    targets)` is the logit lens's own metrics function."""
    count = parallel_streams(model)
    if not count:
        return None
    values: dict[str, list[list[float]]] = {metric: [[] for _ in range(count)] for metric in STREAM_METRICS}
    for stream in capture.streams:
        for k in range(count):
            logits = model.head(model.norm(stream[k]))[:, :positions]
            scored = score(logits, final_logp, targets)
            for metric in STREAM_METRICS:
                values[metric][k].append(scored[metric].mean().item())
    read = read_weights(capture.sites, capture.streams[:-1], count)
    return StreamLens(count, values["loss"], values["agreement"], values["kl"], read)
