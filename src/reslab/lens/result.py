"""`LensResult`: the logit lens of one batch, by entry (the embedding, then each sublayer's site), as numbers, as
the table `reslab lens` prints, and as a notebook table (`_repr_html_`, `to_pandas`) with the same columns.

Its Python names are the table's: `top_1` (the `top-1` column: agreement of the decoded argmax with the model's
output; `agreement` is the older name), `kl` (`KL`), `dla` (`DLA`, additive schemes only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from reslab.display import data_frame, html_block, html_table
from reslab.lens.decomposition import Decomposition
from reslab.lens.streams import StreamLens

METRICS = ("loss", "entropy", "agreement", "kl")  # the keys of per_position, rows() and the JSON
# how each entry's stream went through the final norm: the JSON's "norm", and the note that explains it
RECOMPUTED, FROZEN = "recomputed", "frozen"
NORMS = {RECOMPUTED: "the final norm recomputed on each entry's own stream (the standard logit lens)",
         FROZEN: "the final norm's scale frozen at its value on the model's own last stream (--frozen-norm; "
                 "TransformerLens' cached scale)"}
# the columns of `reslab lens`, each with the format it prints (`after` left-aligned, the numbers right-aligned)
COLUMNS = {"after": "<10", "loss": "8.4f", "entropy": "8.4f", "top-1": "7.3f", "KL": "8.4f", "DLA": "8.4f",
           "tuned loss": "10.4f", "tuned KL": "8.4f"}


@dataclass(repr=False)
class LensResult:
    """The logit lens of one batch. Means are over evaluated tokens; `per_position[metric]` is (entries, batch,
    positions). `stream` says how the stream was read at each site; `decomposition` is the final stream split into
    its writes (None for schemes whose stream is not a sum, with the reason in `refused`)."""

    names: list[str]
    loss: list[float]
    entropy: list[float]
    top_1: list[float]
    kl: list[float]
    per_position: dict[str, torch.Tensor]
    scheme: str
    stream: str
    tokens: int
    decomposition: Decomposition | None = None
    refused: str | None = None
    logits: torch.Tensor | None = field(default=None, repr=False)  # (entries, batch, positions, vocab) if kept
    tuned: dict[str, list[float]] | None = None  # the tuned lens's means by metric, when one was given
    streams: StreamLens | None = None  # each parallel stream decoded on its own (multi-stream schemes)
    norm: str = RECOMPUTED  # how the final norm was applied to each entry (a key of NORMS)
    modules: dict[str, Any] | None = None  # the modules the lens used: final norm, head, each entry's stream

    @property
    def agreement(self) -> list[float]:
        """The older name of `top_1`."""
        return self.top_1

    @property
    def after(self) -> list[str]:
        """The `after` column: the entries' names."""
        return self.names

    @property
    def dla(self) -> list[float] | None:
        """The `DLA` column: each entry's mean direct logit contribution to the correct token (None when the
        scheme's stream has no decomposition); for a traced model, the sum of the writes of that entry's block."""
        return self.decomposition.by_entry(self.names) if self.decomposition is not None else None

    def rows(self) -> list[dict[str, Any]]:
        """One dict per entry: name and the four means (and the tuned lens's, as tuned_<metric>)."""
        tuned = self.tuned or {}
        means = dict(zip(METRICS, (self.loss, self.entropy, self.top_1, self.kl)))
        return [{"name": name, **{metric: means[metric][i] for metric in METRICS},
                 **{f"tuned_{metric}": values[i] for metric, values in tuned.items()}}
                for i, name in enumerate(self.names)]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able numbers: the table, how the stream was read, and the decomposition's means."""
        record = {"scheme": self.scheme, "stream": self.stream, "norm": self.norm, "tokens": self.tokens,
                  "layers": self.rows()}
        if self.modules is not None:
            record["modules"] = self.modules
        if self.decomposition is not None:
            record["decomposition"] = self.decomposition.to_dict()
        else:
            record["decomposition_refused"] = self.refused
        if self.streams is not None:
            record["streams"] = self.streams.to_dict()
        return record

    # --- the table `reslab lens` prints, and the same in a notebook ------------------------------------------------
    def columns(self) -> dict[str, list[Any]]:
        """The table by column, keyed by the CLI's column names: after, loss, entropy, top-1, KL, then DLA
        (additive schemes) and tuned loss, tuned KL (with a tuned lens)."""
        table: dict[str, list[Any]] = {"after": self.names, "loss": self.loss, "entropy": self.entropy,
                                       "top-1": self.top_1, "KL": self.kl}
        if self.decomposition is not None:
            table["DLA"] = self.dla
        if self.tuned:
            table["tuned loss"], table["tuned KL"] = self.tuned["loss"], self.tuned["kl"]
        return table

    def table(self) -> str:
        """The table as `reslab lens` prints it."""
        columns = self.columns()
        formats = {**COLUMNS, "after": f"<{max(10, *map(len, self.names))}"}  # traced entries: block paths
        header = " ".join(format(name, formats[name] if name == "after" else f">{_width(COLUMNS[name])}")
                          for name in columns)
        lines = [" ".join(format(value, formats[name]) for name, value in zip(columns, row))
                 for row in zip(*columns.values())]
        return "\n".join([header, "-" * len(header), *lines])

    def notes(self) -> list[str]:
        """What the table means, in a few lines."""
        notes = [f"stream: {self.stream}", f"norm: {NORMS[self.norm]}",
                 "loss: next-token loss of the decoded stream; "
                 "top-1 and KL (final || lens): against the model's output"]
        if self.modules is not None:
            used, after = self.modules, self.modules.get("after_head")
            notes.append(f"modules: final norm {', '.join(used['final_norm']) or 'none'}; head {used['head']}"
                         + (f"; after the head {', '.join(after)}" if after else ""))
        if self.streams is not None:
            notes.append(f"per stream ({self.streams.count} streams): {self.streams.how}")
        parts = self.decomposition
        if parts is None:
            notes.append(f"decomposition refused: {self.refused}")
        else:
            notes.append(f"DLA: direct logit contribution to the correct token, {parts.norm} scale frozen at the "
                         f"final stream's; components + bias ({parts.bias.mean().item():.4f}) = the model's logit "
                         f"({parts.target_logit.mean().item():.4f}), max error {parts.sum_error:.1e}")
            if parts.entries is not None:
                notes.append("DLA of a block: the sum of the writes its residual adds put on the stream "
                             f"({len(parts.names) - 1} writes in all: decomposition.names; lens/dla_traced.py)")
        return notes

    def to_pandas(self):
        """The table as a pandas DataFrame, the CLI's column names, unrounded numbers."""
        return data_frame(self.columns())

    def _repr_html_(self) -> str:
        caption = f"logit lens, {self.scheme}: {self.tokens} tokens, final norm {self.norm}"
        return html_block(html_table(self.columns(), caption, COLUMNS), notes=self.notes())

    def __repr__(self) -> str:
        dla = f"DLA ({self.decomposition.norm})" if self.decomposition is not None else "no DLA (not additive)"
        return (f"LensResult({self.scheme!r}, {self.tokens} tokens, {len(self.names)} entries: {self.names[0]} .. "
                f"{self.names[-1]}, final norm {self.norm})\n  loss {self.loss[0]:.4f} -> {self.loss[-1]:.4f}, "
                f"KL {self.kl[0]:.4f} -> {self.kl[-1]:.4f}, {dla}{', tuned lens' if self.tuned else ''}; "
                ".table(), .to_pandas()")

    __str__ = table


def _width(spec: str) -> int:
    return int(spec.lstrip("<>").split(".")[0])
