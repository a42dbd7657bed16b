"""Weights of the reference mHC-lite module (FFTYYY/mhc-lite `hyper_conn/mhc_lite.py` @ea19775, class `MHCLite`)
into reslab's `mhc-lite` site, so that the two compute the same stream update.

The reference keeps its weights in HC's layout: `static_alpha` = [b_pre (n) | b_res (n!)], `dynamic_alpha_fn` =
[W_pre | W_res] (n D x (n + n!)), `static_beta` = b_post, `dynamic_beta_fn` = W_post, three scales
(`pre_branch_scale`, `h_post_scale`, `residual_scale`) and the RMSNorm gain `norm.gamma` over n D channels
(reference lines 246, 261-302). reslab's site holds [W_pre | W_post | W_res] in one matrix and the scales as one
vector `gates` = (s_pre, s_post, s_res). The permutation order is the same on both sides (`itertools`), so b_res and
W_res's columns copy as they are.

Only the configuration reslab computes is accepted: one fraction, one input view, the branch output added back,
channels last, no residual transform, no dropout and the plain `add`; anything else is refused in one line.
"""

from __future__ import annotations

from math import factorial

import torch
from torch import nn

from reslab.errors import ReslabError


def load_mhc_lite_site(site: nn.Module, reference: nn.Module) -> None:
    """Copy a reference `MHCLite` module's weights into a reslab `mhc-lite` site, in place (values cast to the
    site's dtype). Both must have the same streams n and width: the reference's `dim` is the site's width."""
    check_reference(site, reference)
    n = site.num_streams
    alpha_static, alpha_dynamic = reference.static_alpha.detach(), reference.dynamic_alpha_fn.detach()
    gates = torch.stack([reference.pre_branch_scale.detach().reshape(()),
                         reference.h_post_scale.detach().reshape(()),
                         reference.residual_scale.detach().reshape(())])
    values = {
        "norm_gain": reference.norm.gamma.detach(),
        "dynamic_proj": torch.cat([alpha_dynamic[:, :n], reference.dynamic_beta_fn.detach(), alpha_dynamic[:, n:]],
                                  dim=-1),
        "gates": gates,
        "read_bias": alpha_static[:n],
        "write_bias": reference.static_beta.detach(),
        "perm_bias": alpha_static[n:],
    }
    with torch.no_grad():
        for name, value in values.items():
            target = getattr(site, name)
            if target.shape != value.shape:
                raise ReslabError(f"mhc-lite site {name} has shape {tuple(target.shape)}, the reference's "
                                  f"{tuple(value.shape)}; build both with the same streams and width")
            target.copy_(value)


def check_reference(site: nn.Module, reference: nn.Module) -> None:
    """Refuse, in one line, a reference module configured to compute something the site does not."""
    if getattr(site, "name", None) != "mhc-lite":
        raise ReslabError(f"load_mhc_lite_site needs a reslab 'mhc-lite' site, got {type(site).__name__}; build one "
                          "with get_scheme('mhc-lite')")
    n = getattr(reference, "num_residual_streams", None)
    if n != site.num_streams:
        raise ReslabError(f"the reference mHC-lite module has {n} streams, the site {site.num_streams}; build the "
                          "site with streams equal to the reference's num_residual_streams")
    refusals = {
        "num_fracs": (reference.num_fracs == 1, "frac-connections (num_fracs > 1)"),
        "num_input_views": (reference.num_input_views == 1, "several input views (num_input_views > 1)"),
        "add_branch_out_to_residual": (reference.add_branch_out_to_residual, "no branch output added back"),
        "channel_first": (not reference.channel_first, "channels first"),
        "residual_transform": (isinstance(reference.residual_transform, nn.Identity), "a residual transform"),
        "dropout": (reference.dropout.p == 0, "dropout on the updated streams"),
        "depth_residual_fn": (getattr(reference.depth_residual_fn, "__name__", "") == "add",
                              "a depth_residual_fn other than add"),
    }
    for attribute, (supported, what) in refusals.items():
        if not supported:
            raise ReslabError(f"the reference mHC-lite module uses {what}, which reslab's mhc-lite does not compute; "
                              f"build it with the default {attribute}")
    if reference.static_alpha.numel() != n + factorial(n):
        raise ReslabError(f"the reference's static_alpha has {reference.static_alpha.numel()} entries, not "
                          f"n + n! = {n + factorial(n)}; it is not an MHCLite module of {n} streams")
