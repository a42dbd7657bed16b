"""What the residual stream does, measured where each sublayer meets it.

Attached to every `ResidualSite` for one forward pass (a log step), it records:
- update ratio ||F(x)|| / ||x|| per sublayer: how much a sublayer writes relative to the stream;
- stream RMS after each block;
- drift: mean cosine similarity between a block's input and output streams (1 = unchanged).
No extra forward pass: the numbers come from tensors the forward computes anyway, reduced under no_grad.
The probe keeps sums (of squares, of cosines, and counts), so several forwards of one step (micro-batches) and
the shares of a batch held by several processes combine into the numbers of the whole batch.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


class StreamProbe:
    def __init__(self):
        self._block_inputs: dict[int, torch.Tensor] = {}
        self._ratios: dict[tuple[int, int], torch.Tensor] = {}  # [sum F(x)^2, sum x^2]
        self._rms: dict[int, torch.Tensor] = {}  # [sum out^2, numel]
        self._drift: dict[int, torch.Tensor] = {}  # [sum of cosines, count]

    @staticmethod
    def _add(sums: dict, key, *values: torch.Tensor) -> None:
        new = torch.stack(values)
        sums[key] = sums[key] + new if key in sums else new

    @torch.no_grad()
    def record(self, site, x: torch.Tensor, fx: torch.Tensor, out: torch.Tensor) -> None:
        spec = site.spec
        x, fx, out = x.detach().float(), fx.detach().float(), out.detach().float()
        self._add(self._ratios, (spec.layer, spec.index), fx.pow(2).sum(), x.pow(2).sum())
        if spec.index == 0:
            self._block_inputs[spec.layer] = x
        if spec.index == spec.sublayers_per_block - 1:
            self._add(self._rms, spec.layer, out.pow(2).sum(), out.new_tensor(out.numel()))
            block_input = self._block_inputs.pop(spec.layer, None)
            if block_input is not None and block_input.shape == out.shape:
                cosines = F.cosine_similarity(block_input, out, dim=-1)
                self._add(self._drift, spec.layer, cosines.sum(), out.new_tensor(cosines.numel()))

    @contextmanager
    def attached(self, model: nn.Module):
        """Attach to every residual site of `model` for the duration of the `with` block."""
        sites = [site for _, _, site in model.residual_sites()]
        for site in sites:
            site.probe = self
        try:
            yield self
        finally:
            for site in sites:
                site.probe = None

    def to_metrics(self, reduce=None) -> dict:
        """Plain floats, one host copy: stream_rms and drift per block, update_ratio per block as [attn, ffn].

        `reduce` (e.g. a sum over the ranks of a distributed run) is applied to the stacked sums first.
        """
        keys = sorted(self._ratios)
        if not keys:
            return {"stream_rms": [], "update_ratio": [], "drift": []}
        sums = torch.stack([self._ratios[k] for k in keys]
                           + [self._rms[k] for k in sorted(self._rms)]
                           + [self._drift[k] for k in sorted(self._drift)])
        if reduce is not None:
            sums = reduce(sums)
        ratio_sums, rms_sums = sums[:len(keys)], sums[len(keys):len(keys) + len(self._rms)]
        drift_sums = sums[len(keys) + len(self._rms):]
        values = torch.cat([ratio_sums[:, 0].sqrt() / ratio_sums[:, 1].sqrt().clamp_min(1e-12),  # ||F(x)|| / ||x||
                            (rms_sums[:, 0] / rms_sums[:, 1]).sqrt(),
                            drift_sums[:, 0] / drift_sums[:, 1]]).tolist()
        ratios = dict(zip(keys, values))
        rms = values[len(keys):len(keys) + len(self._rms)]
        drift = values[len(keys) + len(self._rms):]
        layers = sorted({layer for layer, _ in keys})
        per_block = [[ratios[(layer, i)] for i in sorted(i for owner, i in keys if owner == layer)] for layer in layers]
        return {"stream_rms": rms, "update_ratio": per_block, "drift": drift}
