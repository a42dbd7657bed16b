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

Connections across depth with fixed coefficients (x0 injection, residual scales, U-net and long skips, backout,
DenseFormer's averages: `Connection.static`) keep the final stream a linear combination of the same components,
`x_L = a_e e + sum_i a_i w_i`, with coefficients that do not depend on the stream. They are measured, not assumed:
one more forward in which every sublayer's input is cut from the graph and its write (and the embedding) is a leaf;
the gradient of `u . x_L` for a random direction `u` is `a_i u` at every token, so one backward gives every
coefficient. The components are then `a_e e` and `a_i w_i`, and the rest is as above (`stream_error` checks it).

Schemes whose stream is not such a sum (post, deepnorm, none, post-none, article-edit: a norm or no skip inside the
sites; hc/mhc: mixed streams; attnres: a learned mix of earlier outputs; MUDD and gated x0: coefficients computed
from the stream) are refused with one line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from reslab.errors import ReslabError
from reslab.lens.capture import capture_forward, check_lens_model, inputs_and_targets, site_names
from reslab.lens.decomposition import Decomposition
from reslab.nn.norms import LayerNorm, RMSNorm


def refusal(model: nn.Module) -> str | None:
    """Why the final stream of `model` cannot be decomposed into writes, in one line; None when it can."""
    check_lens_model(model)
    sites = [site for _, _, site in model.residual_sites()]
    plain = [site for site in sites if not type(site).additive_stream and not weighted(site)]
    composed = [site for site in plain if getattr(site, "connections", None) is not None]
    if composed and type(composed[0]).base.name not in RAW_WRITE_BASES and type(composed[0]).base.additive_stream:
        scheme = type(composed[0])
        return (f"residual {scheme.name!r}: the lens measures the coefficients of connections across depth on pre "
                f"or add only, whose writes are the sublayers' outputs as they are ({scheme.base.name!r} changes "
                "them); the logit lens still applies")
    dynamic = [c for site in plain for c in getattr(site, "connections", {}).values() if not (c.additive or c.static)]
    if dynamic and type(plain[0]).base.additive_stream:
        return (f"connection {dynamic[0].name!r} ({dynamic[0].formula}) computes its coefficients from the stream, so "
                "the final stream is not a sum of writes with fixed coefficients (the logit lens still applies)")
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


# the bases whose write is the sublayer's output as it is (x + F): where the measured coefficients take the sublayers'
# outputs as the writes (sandwich normalises F, layerscale and rezero scale it: a coefficient would count it twice)
RAW_WRITE_BASES = ("pre", "add")


def weighted(site: nn.Module) -> bool:
    """Is `site` a composition on pre or add with connections across depth of fixed coefficients only?"""
    connections = getattr(site, "connections", None)
    return connections is not None and type(site).base.name in RAW_WRITE_BASES and all(
        c.additive or c.static for c in connections.values())


def write_coefficients(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(components, batch, seq): the coefficient of the embedding and of each sublayer's write in the final stream,
    measured by one forward with every write (and the embedding) a leaf and every sublayer's input cut from the
    graph, and one backward of `u . x_L` (see the module docstring)."""
    leaves: list[torch.Tensor] = []

    def embedding_leaf(site, args):
        stream = args[0]
        leaf = stream.x.detach().requires_grad_()
        leaves.insert(0, leaf)
        return (stream._replace(x=leaf, x0=leaf), *args[1:])

    def write_leaf(sublayer, args, output):
        leaves.append(output.detach().requires_grad_())
        return leaves[-1]

    sites = [site for _, _, site in model.residual_sites()]
    sublayers = [sublayer for block in model.blocks for _, sublayer in block.sites()]
    handles = [sites[0].register_forward_pre_hook(embedding_leaf)]
    handles += [s.register_forward_pre_hook(lambda m, args: tuple(a.detach() for a in args)) for s in sublayers]
    handles += [s.register_forward_hook(write_leaf) for s in sublayers]
    final: list[Any] = []
    handles.append(sites[-1].register_forward_hook(lambda m, args, output: final.append(output)))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            model(tokens)
            stream = model.stream.reduce(final[0])
            direction = torch.randn(stream.shape, generator=torch.Generator().manual_seed(0)).to(stream)
            grads = torch.autograd.grad((stream * direction).sum(), leaves, allow_unused=True)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    norm = direction.square().sum(-1)
    return torch.stack([torch.zeros_like(norm) if g is None else (g * direction).sum(-1) / norm for g in grads])


def decomposition_from(model: nn.Module, capture, output: torch.Tensor, targets: torch.Tensor,
                       positions: int) -> Decomposition:
    """The decomposition of a captured forward (see the module docstring); targets (batch, positions)."""
    writes = torch.stack([model.stream.reduce(capture.streams[0]), *capture.writes]).float()
    coefficients = None
    if weighted(capture.sites[0]):
        measured = write_coefficients(model, capture.streams[0].tokens).float()
        writes = writes * measured.unsqueeze(-1)
        coefficients = measured.flatten(1).mean(1).tolist()
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
                         stream_error, kind, coefficients)


@torch.no_grad()
def decompose(model: nn.Module, tokens, targets=None) -> Decomposition:
    """The decomposition of `model`'s final stream on `tokens`; a ReslabError (one line) for schemes without one.
    A module that is not a reslab language model (a Hugging Face model, a callable's) is read from its traced graph:
    its writes are what its residual adds add to the stream (`lens/dla_traced.py`)."""
    from reslab.contracts import LensModel, missing

    if missing(model, LensModel) is not None:
        from reslab.lens.dla_traced import decompose_traced

        return decompose_traced(model, tokens, targets)
    reason = refusal(model)
    if reason:
        raise ReslabError(reason)
    tokens, targets, positions = inputs_and_targets(tokens, targets)
    device = next(model.parameters()).device
    capture, output = capture_forward(model, tokens.to(device))
    return decomposition_from(model, capture, output, targets.to(device), positions)
