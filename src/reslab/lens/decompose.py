"""Direct logit attribution: the final stream split into the embedding's and every sublayer's write, and each
write's contribution to the logit of the correct (next) token.

Where a scheme's stream is a sum (`ResidualSite.additive_stream`: pre, sandwich, rezero, layerscale, add,
value-residual), the stream entering the final norm is exactly

    x_L = e + sum_i w_i          e: the embedding (tokens + positions), w_i: sublayer i's write as its site adds it

The final norm is linear in x once its scale s is frozen at the value computed from the full stream x_L
(TransformerLens' `apply_ln_to_stack`). With head weight W and target token y:

    LayerNorm:  logit_y = sum_c W_y . (g * (c - mean(c)) / s) + W_y . b + bias_y,   s = sqrt(var(x_L) + eps)
    RMSNorm:    logit_y = sum_c W_y . (g * c / s) + bias_y,                          s = sqrt(mean(x_L^2) + eps)
    no norm:    logit_y = sum_c W_y . c + bias_y

summed over the components c in {e, w_1, ..., w_n}. `contributions` holds the terms of the sum; `bias` holds
`W_y . b + bias_y` (zero without a norm bias or head bias); the two add up to the model's logit exactly, up to
float rounding. The centring is split among the components (mean is linear), so it leaves no remainder.

Schemes whose stream is not such a sum (post, deepnorm, none, post-none, article-edit: a norm or no skip inside the
sites; hc/mhc: mixed streams; attnres: a learned mix of earlier outputs) are refused with one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from reslab.errors import ReslabError
from reslab.lens.capture import capture_forward, check_lens_model, inputs_and_targets, site_names
from reslab.nn.norms import LayerNorm, RMSNorm


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

    @property
    def sum_error(self) -> float:
        """max |sum of contributions + bias - the model's logit|: 0 up to float rounding."""
        return (self.contributions.sum(0) + self.bias - self.target_logit).abs().max().item()

    def mean_contributions(self) -> list[float]:
        return self.contributions.flatten(1).mean(1).tolist()

    def to_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "components": dict(zip(self.names, self.mean_contributions())),
                "bias": self.bias.mean().item(), "target_logit": self.target_logit.mean().item(),
                "sum_error": self.sum_error, "stream_error": self.stream_error}


def refusal(model: nn.Module) -> str | None:
    """Why the final stream of `model` cannot be decomposed into writes, in one line; None when it can."""
    check_lens_model(model)
    sites = [site for _, _, site in model.residual_sites()]
    plain = [site for site in sites if not type(site).additive_stream]
    if plain:
        scheme = type(plain[0])
        return (f"residual scheme {scheme.name!r} ({scheme.formula}) does not keep the stream as embedding + sum of "
                "the sublayers' writes, so the final stream has no decomposition into writes (the logit lens still "
                "applies); schemes that do: pre, sandwich, rezero, layerscale, add, value-residual")
    if not isinstance(model.head, nn.Linear):
        return f"the head is a {type(model.head).__name__}, not a linear map, so writes cannot be passed through it"
    if not isinstance(model.norm, (nn.Identity, LayerNorm, RMSNorm, nn.LayerNorm, nn.RMSNorm)):
        return f"the final norm {type(model.norm).__name__} is not LayerNorm or RMSNorm; its frozen form is unknown"
    return None


def frozen_norm(norm: nn.Module, final: torch.Tensor) -> tuple[str, Callable[[torch.Tensor], torch.Tensor], Any]:
    """(kind, the norm as a linear map with its scale frozen at the final stream's, its bias or None)."""
    if isinstance(norm, nn.Identity):
        return "none", lambda c: c, None
    eps = norm.eps if norm.eps is not None else torch.finfo(final.dtype).eps
    weight = norm.weight if norm.weight is not None else 1.0
    final = final.float()
    if isinstance(norm, (LayerNorm, nn.LayerNorm)):
        scale = (final.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
        return "layernorm", lambda c: (c - c.mean(-1, keepdim=True)) / scale * weight, norm.bias
    scale = (final.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return "rmsnorm", lambda c: c / scale * weight, None


def decomposition_from(model: nn.Module, capture, output: torch.Tensor, targets: torch.Tensor,
                       positions: int) -> Decomposition:
    """The decomposition of a captured forward (see the module docstring); targets (batch, positions)."""
    writes = torch.stack([model.stream.reduce(capture.streams[0]), *capture.writes]).float()
    final = model.stream.reduce(capture.streams[-1]).float()
    kind, linear, norm_bias = frozen_norm(model.norm, final)
    direction = model.head.weight.float()[targets]  # W_y: (batch, positions, width)
    contributions = torch.stack([(linear(w)[:, :positions] * direction).sum(-1) for w in writes])
    bias = torch.zeros_like(contributions[0])
    if norm_bias is not None:
        bias = bias + direction @ norm_bias.float()
    if model.head.bias is not None:
        bias = bias + model.head.bias.float()[targets]
    target_logit = output[:, :positions].float().gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    stream_error = (writes.sum(0) - final).abs().max().item()
    return Decomposition(site_names(model), writes.cpu(), contributions.cpu(), bias.cpu(), target_logit.cpu(),
                         stream_error, kind)


@torch.no_grad()
def decompose(model: nn.Module, tokens, targets=None) -> Decomposition:
    """The decomposition of `model`'s final stream on `tokens`; a ReslabError (one line) for schemes without one."""
    reason = refusal(model)
    if reason:
        raise ReslabError(reason)
    tokens, targets, positions = inputs_and_targets(tokens, targets)
    device = next(model.parameters()).device
    capture, output = capture_forward(model, tokens.to(device))
    return decomposition_from(model, capture, output, targets.to(device), positions)
