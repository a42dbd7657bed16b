"""Weights of Gemma 3n's AltUp (transformers 5.25 `models/gemma3n/modeling_gemma3n.py`) into reslab's `altup`
scheme, so that the two compute the same predict and correct, and the same widening and collapse of the stream.

- `load_altup_site(site, reference)`: one `Gemma3nTextAltUp` (a decoder layer's `altup`) into the attention site of
  a reslab block, which owns the block's coefficients (`site.altup`, named as the reference's parameters:
  `router_norm`, `modality_router`, `prediction_coefs`, `correction_coefs`). The FFN site has no AltUp weights: it
  corrects with its block's. `correct_output_scale` is not copied: it only gates Gemma 3n's per-layer inputs.
- `load_altup_adapter(adapter, reference_model)`: a `Gemma3nTextModel`'s `altup_projections` and
  `altup_unembed_projections` into the model's stream adapter (`model.stream`).
- `load_altup_model(model, reference_model)`: both, for every block (the rest of the model is not converted).

Only what reslab computes is accepted: the active stream 0, the router norm an RMSNorm with the reference's epsilon
(build the model with `rmsnorm`, e.g. llama, and its `norm_eps`), the same clip; anything else is one line.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from reslab.errors import ReslabError
from reslab.nn.norms import RMSNorm

COEFFICIENTS = ("modality_router", "prediction_coefs", "correction_coefs")


def load_altup_site(site: nn.Module, reference: nn.Module) -> None:
    """Copy a `Gemma3nTextAltUp`'s weights into a reslab `altup` attention site, in place (cast to its dtype)."""
    check_site(site, reference)
    altup = site.altup
    with torch.no_grad():
        altup.router_norm.weight.copy_(reference.router_norm.weight)
        for name in COEFFICIENTS:
            target, value = getattr(altup, name).weight, getattr(reference, name).weight
            if target.shape != value.shape:
                raise ReslabError(f"altup site {name} has shape {tuple(target.shape)}, the reference's "
                                  f"{tuple(value.shape)}; build both with the same streams and width")
            target.copy_(value)


def check_site(site: nn.Module, reference: nn.Module) -> None:
    """Refuse, in one line, a site or a reference configured to compute something else."""
    if getattr(site, "name", None) != "altup" or getattr(site, "altup", None) is None:
        raise ReslabError(f"load_altup_site needs the attention site (index 0) of a reslab 'altup' block, got "
                          f"{type(site).__name__}; the FFN site holds no AltUp weights")
    config = getattr(reference, "config", None)
    if config is None or not all(hasattr(reference, name) for name in (*COEFFICIENTS, "router_norm")):
        raise ReslabError(f"the reference is a {type(reference).__name__}, not a Gemma3nTextAltUp; pass a decoder "
                          "layer's `altup`")
    if config.altup_num_inputs != site.num_streams:
        raise ReslabError(f"the reference has altup_num_inputs {config.altup_num_inputs}, the site "
                          f"{site.num_streams} streams; build the site with --set altup_streams="
                          f"{config.altup_num_inputs}")
    if config.altup_active_idx != 0:
        raise ReslabError(f"the reference computes on stream {config.altup_active_idx}; reslab's altup computes on "
                          "stream 0 (Gemma 3n's default altup_active_idx)")
    clip = float(config.altup_coef_clip or 0.0)
    if clip != site.altup.clip:
        raise ReslabError(f"the reference clips its coefficients at {clip:g}, the site at {site.altup.clip:g}; build "
                          f"the site with --set altup_coef_clip={clip:g}")
    norm, eps = site.altup.router_norm, reference.router_norm.variance_epsilon
    if not isinstance(norm, RMSNorm) or norm.eps != eps:
        raise ReslabError(f"Gemma 3n's router norm is an RMSNorm with eps {eps:g}, the site's a "
                          f"{type(norm).__name__}{f' with eps {norm.eps:g}' if isinstance(norm, RMSNorm) else ''}; "
                          f"build the model with RMSNorm (llama) and --norm-eps {eps:g}")


def load_altup_adapter(adapter: nn.Module, reference_model: nn.Module) -> None:
    """Copy a `Gemma3nTextModel`'s widening and collapse projections into reslab's `AltUpAdapter`, in place."""
    for name in ("altup_projections", "altup_unembed_projections"):
        targets, sources = getattr(adapter, name, None), getattr(reference_model, name, None)
        if targets is None or sources is None:
            holder = type(adapter if targets is None else reference_model).__name__
            raise ReslabError(f"{holder} has no {name}; pass the altup model's stream adapter (model.stream) and a "
                              "Gemma3nTextModel")
        if len(targets) != len(sources):
            raise ReslabError(f"the reference has {len(sources) + 1} AltUp streams, the adapter {len(targets) + 1}; "
                              f"build the model with --set altup_streams={len(sources) + 1}")
        with torch.no_grad():
            for target, source in zip(targets, sources):
                if target.weight.shape != source.weight.shape:
                    raise ReslabError(f"{name} weight has shape {tuple(target.weight.shape)}, the reference's "
                                      f"{tuple(source.weight.shape)}; build both with the same width")
                target.weight.copy_(source.weight)


def load_altup_model(model: nn.Module, reference_model: nn.Module) -> None:
    """The AltUp weights of a `Gemma3nTextModel` (every layer's `altup`, the widening and collapse) into a reslab
    model built with `--residual altup`, block by block."""
    layers = getattr(reference_model, "layers", ())
    if len(layers) != len(model.blocks):
        raise ReslabError(f"the reference has {len(layers)} layers, the model {len(model.blocks)} blocks; build the "
                          f"model with --layers {len(layers)}")
    load_altup_adapter(model.stream, reference_model)
    for block, layer in zip(model.blocks, layers):
        load_altup_site(block.attn_residual, layer.altup)
