"""What the residual stream does, measured where each sublayer meets it.

Attached to every `ResidualSite` for one forward pass (a log step), it records:
- update ratio ||F(x)|| / ||x|| per sublayer: how much a sublayer writes relative to the stream;
- stream RMS after each block;
- drift: mean cosine similarity between a block's input and output streams (1 = unchanged).
No extra forward pass: the numbers come from tensors the forward computes anyway, reduced under no_grad.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


class StreamProbe:
    def __init__(self):
        self._block_inputs: dict[int, torch.Tensor] = {}
        self._ratios: dict[tuple[int, int], torch.Tensor] = {}
        self._rms: dict[int, torch.Tensor] = {}
        self._drift: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def record(self, site, x: torch.Tensor, fx: torch.Tensor, out: torch.Tensor) -> None:
        spec = site.spec
        x, fx, out = x.detach().float(), fx.detach().float(), out.detach().float()
        self._ratios[(spec.layer, spec.index)] = fx.norm() / x.norm().clamp_min(1e-12)
        if spec.index == 0:
            self._block_inputs[spec.layer] = x
        if spec.index == spec.sublayers_per_block - 1:
            self._rms[spec.layer] = out.pow(2).mean().sqrt()
            block_input = self._block_inputs.pop(spec.layer, None)
            if block_input is not None and block_input.shape == out.shape:
                self._drift[spec.layer] = F.cosine_similarity(block_input, out, dim=-1).mean()

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

    def to_metrics(self) -> dict:
        """Plain floats, one host copy: stream_rms and drift per block, update_ratio per block as [attn, ffn]."""
        keys = sorted(self._ratios)
        values = torch.stack([self._ratios[k] for k in keys]
                             + [self._rms[k] for k in sorted(self._rms)]
                             + [self._drift[k] for k in sorted(self._drift)]).tolist() if keys else []
        ratios = dict(zip(keys, values))
        rms = values[len(keys):len(keys) + len(self._rms)]
        drift = values[len(keys) + len(self._rms):]
        layers = sorted({layer for layer, _ in keys})
        per_block = [[ratios[(layer, i)] for i in sorted(i for l, i in keys if l == layer)] for layer in layers]
        return {"stream_rms": rms, "update_ratio": per_block, "drift": drift}
