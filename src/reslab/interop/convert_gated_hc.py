"""Copy transformers' Qwen4-Exp gated residual (`Qwen4ExpTextGatedResidual`, transformers 5.25) into reslab's
`gated-hc` scheme, so that the two compute the same stream (tests/test_scheme_gated_hc.py checks it).

The names map one to one (reslab.residual.gated_hc.GatedRead):

    hc_norm.weight                 -> norm.weight   (n D,)  the grouped norm's gain offset, (1 + w)
    input_mix_weight_down.weight   -> mix_down      (r, n D)
    input_mix_weight_up.weight     -> mix_up        (n D, r)
    block_inject_weight.weight     -> inject        (n, n D), only in a combining module (a decoder layer's)

A decoder layer's `attn_hyper_connection` / `mlp_hyper_connection` go into a site (`load_gated_hc_site`), the
model's `hyper_connection_mixer` (no injection) into the scheme's stream adapter (`load_gated_hc_mixer`). The
modules are read by attribute, so transformers need not be imported here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from reslab.errors import ReslabError
from reslab.residual.gated_hc import GatedHyperConnections, GatedRead, GatedStreams


def load_gated_hc_site(site: GatedHyperConnections, reference: nn.Module) -> GatedHyperConnections:
    """Copy one decoder layer's hyper-connection (`Qwen4ExpTextGatedResidual(use_combine=True)`) into a gated-hc
    site of the same streams, width and rank; returns the site."""
    if not isinstance(site, GatedHyperConnections):
        raise ReslabError(f"load_gated_hc_site takes a gated-hc site, got {type(site).__name__}; build the model "
                          "with residual='gated-hc'")
    load_gated_read(site.read, reference)
    return site


def load_gated_hc_mixer(adapter: GatedStreams, reference: nn.Module) -> GatedStreams:
    """Copy the model's `hyper_connection_mixer` (`use_combine=False`) into the gated-hc stream adapter (a reslab
    model's `.stream`); returns the adapter."""
    if not isinstance(adapter, GatedStreams):
        raise ReslabError(f"load_gated_hc_mixer takes the gated-hc stream adapter (model.stream), got "
                          f"{type(adapter).__name__}; build the model with residual='gated-hc'")
    load_gated_read(adapter.mixer, reference)
    return adapter


def load_gated_read(ours: GatedRead, reference: nn.Module) -> None:
    """Check that `reference` is a Qwen4-Exp gated residual shaped like `ours` (streams, width, rank, injection or
    not), then copy its weights and its norm's eps, in `ours`' dtype and device."""
    n, width = _reference_shape(reference)
    if (n, width) != (ours.num_streams, ours.width):
        raise ReslabError(f"the reference has hc_count {n} at hidden_size {width}, the site {ours.num_streams} streams "
                          f"at width {ours.width}; build it with gated_hc_streams={n} at width {width}")
    injects = getattr(reference, "block_inject_weight", None) is not None
    if injects != (ours.inject is not None):
        wanted = "a decoder layer's (use_combine=True)" if ours.inject is not None else "the model's mixer"
        raise ReslabError(f"the reference {'has' if injects else 'lacks'} block_inject_weight; load {wanted} "
                          "gated residual here")
    pairs = [(ours.norm.weight, reference.hc_norm.weight, "hc_norm.weight"),
             (ours.mix_down, reference.input_mix_weight_down.weight, "input_mix_weight_down.weight"),
             (ours.mix_up, reference.input_mix_weight_up.weight, "input_mix_weight_up.weight")]
    if injects:
        pairs.append((ours.inject, reference.block_inject_weight.weight, "block_inject_weight.weight"))
    for target, source, name in pairs:
        if target.shape != source.shape:
            raise ReslabError(f"reference {name} has shape {tuple(source.shape)}, the site {tuple(target.shape)}; "
                              f"build it with gated_hc_rank={reference.input_mix_weight_down.weight.shape[0]}")
    with torch.no_grad():
        for target, source, _ in pairs:
            target.copy_(source.detach().to(device=target.device, dtype=target.dtype))
    ours.norm.eps = float(reference.hc_norm.eps)


def _reference_shape(reference: nn.Module) -> tuple[int, int]:
    """(hc_count, hidden_size) of a `Qwen4ExpTextGatedResidual`; one line for anything else."""
    missing = [name for name in ("hc_count", "hidden_size", "hc_norm", "input_mix_weight_down", "input_mix_weight_up")
               if not hasattr(reference, name)]
    if missing:
        raise ReslabError(f"{type(reference).__name__} is not a Qwen4-Exp gated residual (no {missing[0]}); pass a "
                          "Qwen4ExpTextGatedResidual (a decoder layer's attn_hyper_connection, or the mixer)")
    group = getattr(reference.hc_norm, "group_size", None)
    if group != reference.hidden_size:
        raise ReslabError(f"the reference's hc_norm normalises groups of {group}, not one stream "
                          f"({reference.hidden_size}); only the grouped norm of Qwen4-Exp is supported")
    return int(reference.hc_count), int(reference.hidden_size)
