"""Load DeepSeek-V4's mHC weights (transformers 5.25, `models/deepseek_v4`) into reslab's `mhc-v4` sites and head.

transformers' `DeepseekV4HyperConnection` (`attn_hc`, `ffn_hc` of each decoder layer) holds `fn`, `base`, `scale`
and the config's `hc_mult`, `hc_sinkhorn_iters`, `hc_eps` and (in `input_norm`) `rms_norm_eps`;
`DeepseekV4HyperHead` (`hc_head`) holds `hc_fn`, `hc_base`, `hc_scale`. reslab's `DeepSeekV4MHC` and
`DeepSeekV4HyperHead` store the same tensors under the same names and shapes (fn split [pre | post | comb] in the
same order), so loading is a checked copy. Nothing here imports transformers: the modules are read by attribute.

Stream layouts: transformers carries the streams as (batch, seq, n, D), reslab as (n, batch, seq, D) lying tokens
first in memory; `to_reference_streams` and `from_reference_streams` turn one into the other without a copy.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from reslab.errors import ReslabError
from reslab.nn.norms import RMSNorm
from reslab.residual.mhc_v4 import DeepSeekV4HyperHead, DeepSeekV4MHC

SITE_TENSORS = ("fn", "base", "scale")
HEAD_TENSORS = ("hc_fn", "hc_base", "hc_scale")


def to_reference_streams(streams: torch.Tensor) -> torch.Tensor:
    """reslab's (n, batch, seq, D) streams as transformers' (batch, seq, n, D)."""
    return streams.movedim(0, 2)


def from_reference_streams(hidden_streams: torch.Tensor) -> torch.Tensor:
    """transformers' (batch, seq, n, D) streams as reslab's (n, batch, seq, D), a view when they are contiguous."""
    return hidden_streams.movedim(2, 0)


def _copy(target: nn.Module, source: nn.Module, names: tuple[str, ...], what: str) -> None:
    """Copy the tensors `names` from `source` into `target`'s parameters of the same names and shapes."""
    for name in names:
        given = getattr(source, name, None)
        if not isinstance(given, torch.Tensor):
            raise ReslabError(f"{what}: the reference module has no tensor {name!r}; pass a transformers "
                              f"{'DeepseekV4HyperHead' if name.startswith('hc_') else 'DeepseekV4HyperConnection'}")
        mine = getattr(target, name)
        if given.shape != mine.shape:
            raise ReslabError(f"{what}: {name} has shape {tuple(given.shape)} in the reference, {tuple(mine.shape)} "
                              "here; build reslab with the reference's hc_mult (mhc_v4_streams) and hidden_size")
        with torch.no_grad():
            mine.copy_(given)


def _norm_eps(module: nn.Module) -> float:
    """The eps of a transformers module's unweighted `input_norm` (the config's rms_norm_eps)."""
    return float(module.input_norm.variance_epsilon)


def load_mhc_v4_site(site: DeepSeekV4MHC, hyper_connection: nn.Module, norm: nn.Module | None = None) -> None:
    """Load one `DeepseekV4HyperConnection` into an `mhc-v4` site: fn, base, scale and the two eps; with `norm`
    (the decoder layer's `input_layernorm` or `post_attention_layernorm`), also the sublayer's pre-norm gain and
    eps. The Sinkhorn iterations must already agree (an option of the site, `mhc_v4_sinkhorn_iters`)."""
    if not isinstance(site, DeepSeekV4MHC):
        raise ReslabError(f"load_mhc_v4_site loads into an mhc-v4 site, not {type(site).__name__}; build the model "
                          "with residual='mhc-v4'")
    iterations = getattr(hyper_connection, "hc_sinkhorn_iters", site.sinkhorn_iters)
    if iterations != site.sinkhorn_iters:
        raise ReslabError(f"the reference runs {iterations} Sinkhorn iterations, this site "
                          f"{site.sinkhorn_iters}; build it with mhc_v4_sinkhorn_iters={iterations}")
    _copy(site, hyper_connection, SITE_TENSORS, "load_mhc_v4_site")
    site.hc_eps, site.rms_eps = float(hyper_connection.hc_eps), _norm_eps(hyper_connection)
    if norm is not None:
        _load_norm(site.norm, norm)


def _load_norm(mine: nn.Module, reference: nn.Module) -> None:
    """A weighted RMSNorm's gain (and eps) into the site's pre-norm."""
    if not isinstance(mine, RMSNorm):
        raise ReslabError(f"the reference's pre-norm is an RMSNorm, the site's a {type(mine).__name__}; build the "
                          "sites with an RMSNorm (reslab's llama or deepseek models)")
    _copy(mine, reference, ("weight",), "load_mhc_v4_site (norm)")
    mine.eps = float(getattr(reference, "variance_epsilon", mine.eps))


def load_mhc_v4_layer(attn_site: DeepSeekV4MHC, ffn_site: DeepSeekV4MHC, decoder_layer: nn.Module) -> None:
    """Load a `DeepseekV4DecoderLayer`'s two connections and their pre-norms into a block's two sites:
    `attn_hc` + `input_layernorm`, then `ffn_hc` + `post_attention_layernorm`."""
    load_mhc_v4_site(attn_site, decoder_layer.attn_hc, decoder_layer.input_layernorm)
    load_mhc_v4_site(ffn_site, decoder_layer.ffn_hc, decoder_layer.post_attention_layernorm)


def load_mhc_v4_head(head: DeepSeekV4HyperHead, hyper_head: nn.Module) -> None:
    """Load a `DeepseekV4HyperHead` (`model.hc_head`) into the `mhc-v4` stream adapter (`model.stream`)."""
    if not isinstance(head, DeepSeekV4HyperHead):
        raise ReslabError(f"load_mhc_v4_head loads into an mhc-v4 model's stream adapter, not {type(head).__name__}; "
                          "pass model.stream of a model built with residual='mhc-v4'")
    _copy(head, hyper_head, HEAD_TENSORS, "load_mhc_v4_head")
    head.hc_eps, head.rms_eps = float(hyper_head.eps), _norm_eps(hyper_head)
