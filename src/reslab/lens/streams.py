"""The lens per stream, for schemes that carry n parallel residual streams (hc, mhc, mhc-v4, mhc-lite, gated-hc, frac
with several streams): what each stream would predict on its own, and how much each site reads it.

For every entry l (the widened embedding, then each site's output) and every stream k, stream k alone is decoded
with the model's own final norm and head, `head(norm(H_l[k]))`, and scored as the logit lens scores the reduced
stream (loss on the next token, top-1 agreement and KL against the model's output). Where a site states its
connection weights (`MultiStreamSite.connection_weights`: hc, mhc, mhc-v4, mhc-lite), `read` holds the mean weight
with which the site reads each stream into its sublayer (H_pre, averaged over tokens when it is computed per
token). The reduced stream the main table decodes is the model's own collapse (`model.stream.reduce`).

A model read from its traced graph (`lens/traced.py`) whose stream between blocks holds several streams, (batch, seq,
n, width) as DeepSeek-V4 carries them or (batch, seq, n width) as Qwen4-Exp does (width: its config's hidden_size),
gets the same table from `traced_per_stream`: stream k alone is
n copies of stream k put through everything after the last block (the model's own collapse, final norm and head).
For a collapse that is a positive weighted sum followed by a scale-free norm (V4's HyperHead and RMSNorm) that is
`head(norm(H_l[k]))` again, up to the norm's eps. The read weights are not known there (`read` None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from reslab.residual.multistream import MultiStreamSite, ParallelStreams

STREAM_METRICS = ("loss", "agreement", "kl")
TRACED_HOW = ("each decoded alone as n copies of it through everything after the last block (the model's own "
              "collapse, final norm and head); read weights: not known from the traced graph")


@dataclass
class StreamLens:
    """Per stream k and entry l: `loss[k][l]`, `agreement[k][l]`, `kl[k][l]`; `read[k][s]`: the mean weight site s
    reads stream k with (None where the scheme does not state its read weights)."""

    count: int
    loss: list[list[float]]
    agreement: list[list[float]]
    kl: list[list[float]]
    read: list[list[float]] | None
    how: str = "each decoded alone with the final norm and head; read: the mean weight the next site reads it with"

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "loss": self.loss, "top_1": self.agreement, "kl": self.kl, "read": self.read}

    def table(self, names: list[str]) -> str:
        """Per entry, each stream's loss (and the weight the next site reads it with, where stated)."""
        column = max(10, *(len(name) for name in names))
        header = f"{'after':<{column}} " + " ".join(f"{f'loss s{k}':>9}" for k in range(self.count))
        if self.read is not None:
            header += "   " + " ".join(f"{f'read s{k}':>8}" for k in range(self.count))
        lines = [header, "-" * len(header)]
        for entry, name in enumerate(names):
            line = f"{name:<{column}} " + " ".join(f"{self.loss[k][entry]:>9.4f}" for k in range(self.count))
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
    if not all(isinstance(site, MultiStreamSite) for site in sites):  # read, mix, write: MultiStreamSite's contract
        return None
    means = []
    for site, entering in zip(sites, streams):
        read = site.connection_weights(entering)[0].float()
        means.append(read.reshape(-1, count).mean(0).tolist())
    return [[site_means[k] for site_means in means] for k in range(count)]


def stream_copies(stream: torch.Tensor, width: int | None) -> tuple[int, Any] | None:
    """(n, k -> n copies of stream k in the stream's own layout) for a traced stream of n > 1 streams: (batch, seq,
    n, width) as DeepSeek-V4 carries it, or (batch, seq, n * width) stream-major as Qwen4-Exp does; None for one."""
    if stream.dim() == 4 and stream.shape[2] > 1:
        return stream.shape[2], lambda k: stream.narrow(2, k, 1).expand_as(stream)
    if stream.dim() == 3 and width and stream.shape[-1] % width == 0 and stream.shape[-1] > width:
        split = stream.unflatten(-1, (stream.shape[-1] // width, width))
        return split.shape[2], lambda k: split.narrow(2, k, 1).expand_as(split).flatten(-2)
    return None


def traced_per_stream(decode, streams: list[torch.Tensor], width: int | None, final_logp: torch.Tensor,
                      targets: torch.Tensor, positions: int, score) -> StreamLens | None:
    """The per-stream lens of a traced model whose stream holds n > 1 streams of `width` (`stream_copies`; None
    otherwise): `decode(stream) -> logits` runs everything after the last block on n copies of stream k."""
    first = stream_copies(streams[0], width)
    if first is None:
        return None
    count = first[0]
    values: dict[str, list[list[float]]] = {metric: [[] for _ in range(count)] for metric in STREAM_METRICS}
    for stream in streams:
        _, copies = stream_copies(stream, width)
        for k in range(count):
            scored = score(decode(copies(k))[:, :positions], final_logp, targets)
            for metric in STREAM_METRICS:
                values[metric][k].append(scored[metric].mean().item())
    return StreamLens(count, values["loss"], values["agreement"], values["kl"], None, TRACED_HOW)


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
