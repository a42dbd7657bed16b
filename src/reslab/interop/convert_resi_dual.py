"""ResiDual's reference weights (microsoft/ResiDual, a fairseq fork) into reslab's `resi-dual` scheme.

The scheme owns three kinds of weights, and the reference holds each under its own name:

| reference (microsoft/ResiDual @8682f75)                    | reslab                                 |
| ---------------------------------------------------------- | -------------------------------------- |
| layer `self_attn_layer_norm` (`resi_dual_layers.py:136`)   | the block's `attn_residual.norm`       |
| layer `final_layer_norm` (`resi_dual_layers.py:177`)       | the block's `ffn_residual.norm`        |
| encoder/decoder `layer_norm` of `res` (`resi_dual.py:157`) | the model's stream adapter, `stream.norm` |

and two numbers: `dec_alpha`/`enc_alpha` (`resi_dual.py:283, 131`) is `resi_dual_alpha`, `*_res_input_norm_scale`
(`resi_dual_layers.py:135`, `resi_dual.py:252`) is `resi_dual_scale`. The sublayers (attention, FFN) are the model's
own and are not touched here. Anything the reslab side would compute differently is refused in one line: a decoder
layer with cross-attention (no reslab site for it), another alpha or scale, a norm of another kind, width, eps or
without the reference's bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from reslab.errors import ReslabError
from reslab.residual.resi_dual import DualOutput, ResiDual

__all__ = ["load_resi_dual", "load_resi_dual_layer", "load_resi_dual_output"]


def load_resi_dual_layer(attn_site: ResiDual, ffn_site: ResiDual, layer: nn.Module) -> None:
    """Copy a reference `ResiDualDecoderLayer` or `ResiDualEncoderLayer` (`resi_dual_layers.py`) into the two
    sites of one reslab block: its post-LN after attention and after the FFN."""
    for site in (attn_site, ffn_site):
        if not isinstance(site, ResiDual):
            raise ReslabError(f"expected a 'resi-dual' residual site, got {type(site).__name__}; build the model "
                              "with --residual resi-dual")
    decoder = hasattr(layer, "encoder_attn")  # fairseq's decoder layer has the attribute, None without cross-attn
    if decoder and layer.encoder_attn is not None:
        raise ReslabError("the reference ResiDual layer has cross-attention (encoder_attn), which reslab's "
                          "decoder-only blocks lack; build it with no_encoder_attn=True")
    key = "dec_res_input_norm_scale" if decoder else "enc_res_input_norm_scale"
    _check_equal(key, getattr(layer.cfg, key), "resi_dual_scale", attn_site.options["resi_dual_scale"])
    fix = "build the model with --norm-eps {theirs}"
    copy_norm(layer.self_attn_layer_norm, attn_site.norm, "self_attn_layer_norm", fix)
    copy_norm(layer.final_layer_norm, ffn_site.norm, "final_layer_norm", fix)


def load_resi_dual_output(adapter: DualOutput, layer_norm: nn.Module, alpha: float) -> None:
    """Copy the reference encoder's or decoder's `layer_norm` (the norm of the dual stream, `resi_dual.py:157`) into
    the scheme's stream adapter, whose `alpha` must be the reference's `dec_alpha`/`enc_alpha`."""
    if not isinstance(adapter, DualOutput):
        raise ReslabError(f"expected the 'resi-dual' stream adapter, got {type(adapter).__name__}; build the model "
                          "with --residual resi-dual")
    _check_equal("alpha", alpha, "resi_dual_alpha", adapter.alpha)
    copy_norm(layer_norm, adapter.norm, "layer_norm", "reslab's is the reference's own (resi_dual.py:157); build "
              "the reference's with eps={ours}")


def load_resi_dual(model: nn.Module, layers: Sequence[nn.Module], layer_norm: nn.Module, cfg: Any) -> None:
    """A whole reference stack into a reslab model built with `--residual resi-dual`: `layers` (the reference's
    `self.layers`, one per reslab block), its output `layer_norm` and its config `cfg` (a decoder's `dec_alpha`,
    else an encoder's `enc_alpha`)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) != len(layers):
        have = "no blocks" if blocks is None else f"{len(blocks)} blocks"
        raise ReslabError(f"the reference has {len(layers)} ResiDual layers but the reslab model {have}; build it "
                          f"with --layers {len(layers)}")
    for block, layer in zip(blocks, layers, strict=True):
        load_resi_dual_layer(block.attn_residual, block.ffn_residual, layer)
    decoder = all(hasattr(layer, "encoder_attn") for layer in layers)
    load_resi_dual_output(model.stream, layer_norm, cfg.dec_alpha if decoder else cfg.enc_alpha)


def copy_norm(source: nn.Module, target: nn.Module, name: str, eps_fix: str) -> None:
    """A reference LayerNorm (weight, bias, eps) into a reslab norm that computes the same function, or one line
    (`eps_fix`, formatted with `theirs` and `ours`, says how to make the two eps agree)."""
    weight, bias = getattr(source, "weight", None), getattr(source, "bias", None)
    if weight is None or not hasattr(target, "weight"):
        raise ReslabError(f"reference {name} has no affine weight to copy into {type(target).__name__}; build it with "
                          "elementwise_affine=True")
    if not hasattr(target, "bias"):  # reslab's RMSNorm: no mean subtraction, not the reference's LayerNorm
        raise ReslabError(f"reference {name} is a LayerNorm, reslab's is {type(target).__name__}; use a model with "
                          "LayerNorm (gpt, tiny)")
    if weight.shape != target.weight.shape:
        raise ReslabError(f"reference {name} has width {weight.shape[-1]}, reslab's {target.weight.shape[-1]}; "
                          f"build the model with --width {weight.shape[-1]}")
    eps = getattr(source, "eps", None)
    if eps != target.eps:
        raise ReslabError(f"reference {name} has eps {eps}, reslab's {target.eps}; "
                          + eps_fix.format(theirs=eps, ours=target.eps))
    if bias is not None and target.bias is None:
        raise ReslabError(f"reference {name} has a bias and reslab's norm has none; build the model with --bias")
    with torch.no_grad():
        target.weight.copy_(weight)
        if target.bias is not None:
            if bias is not None:
                target.bias.copy_(bias)
            else:
                target.bias.zero_()


def _check_equal(theirs_name: str, theirs: float, ours_name: str, ours: float) -> None:
    if float(theirs) != float(ours):
        raise ReslabError(f"reference {theirs_name} is {theirs}, reslab's {ours_name} is {ours}; build the model "
                          f"with --set {ours_name}={theirs}")
