"""Weights of lucidrains/hyper-connections' `HyperConnections(n, dim=D, num_fracs=m)` into reslab's `frac` site.

Why: reslab's Frac-connections (`reslab.residual.frac`) are checked against the package that ships them
(hyper-connections 0.4.11); this copies one of its modules' weights into a site, so both compute the same stream
update (tests/test_scheme_frac.py compares them). The package is not imported here: the module is read by its
attribute names (hyper_connections/hyper_connections.py:188-261).

What maps where (package -> site; n streams, m fractions, d = D/m):
- `static_alpha` (n m, m + n m), rows (fraction, stream), columns read as (fraction, slot) -> `alpha` (m, n, m, 1+n),
  the same numbers in the same order (package lines 293, 297);
- `static_beta` (n m) as (stream, fraction) -> `beta` (m, n, m), the same for every branch fraction (line 311:
  the package broadcasts it over the branch fraction in the write, line 357);
- `dynamic_alpha_fn` (d, m + n m) -> `dynamic_alpha` (d, m, 1+n); `dynamic_beta_fn` (d, m) -> `dynamic_beta`;
  `norm.gamma` (d) -> `dynamic_gain`; `dynamic_alpha_scale`, `dynamic_beta_scale` -> `dynamic_scale` [0], [1].
The package's branch is the caller's; the site applies its own pre-norm `site.norm` before the sublayer, so to
compare, give the package the branch `lambda h: sublayer(site.norm(h))`. Streams: the package keeps n streams in
the batch axis, `(batch n, seq, D)` with the stream index inner (line 282); reslab keeps them first,
`(n, batch, seq, D)`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from reslab.errors import ReslabError
from reslab.residual.frac import FracConnections


def load_frac_site(site: FracConnections, reference: nn.Module) -> FracConnections:
    """Copy `reference` (a hyper_connections `HyperConnections` built with `num_fracs` >= 2) into `site`, in place,
    and return the site. Refuses, in one line, a module the site cannot reproduce."""
    check_reference(site, reference)
    n, m = site.num_streams, site.num_fracs
    with torch.no_grad():
        site.alpha.copy_(reference.static_alpha.reshape(site.alpha.shape))
        site.beta.copy_(reference.static_beta.reshape(1, n, m).expand(m, n, m))
        if site.dynamic:
            site.dynamic_alpha.copy_(reference.dynamic_alpha_fn.reshape(site.dynamic_alpha.shape))
            site.dynamic_beta.copy_(reference.dynamic_beta_fn)
            site.dynamic_gain.copy_(reference.norm.gamma)
            site.dynamic_scale.copy_(torch.stack([reference.dynamic_alpha_scale.reshape(()),
                                                  reference.dynamic_beta_scale.reshape(())]))
    return site


def check_reference(site: FracConnections, reference: nn.Module) -> None:
    """One ReslabError line for a reference whose computation the site's options cannot reproduce."""
    if not isinstance(site, FracConnections):
        raise ReslabError(f"load_frac_site copies into a 'frac' site, not {type(site).__name__}; build the model "
                          "with --residual frac")
    if not hasattr(reference, "static_alpha") or not hasattr(reference, "num_fracs"):
        raise ReslabError(f"load_frac_site reads a hyper_connections HyperConnections module, not "
                          f"{type(reference).__name__}")
    shape = (reference.num_residual_streams, reference.num_fracs, reference.dynamic_alpha_fn.shape[0])
    if shape != (site.num_streams, site.num_fracs, site.fraction_width):
        raise ReslabError(f"reference has {shape[0]} streams of {shape[1]} fractions of width {shape[2]}, the site "
                          f"{site.num_streams} of {site.num_fracs} of width {site.fraction_width}; set frac_streams, "
                          "frac_fractions and the model width to match")
    unsupported = {"num_input_views > 1": reference.num_input_views != 1,
                   "channel_first": reference.channel_first,
                   "add_branch_out_to_residual=False": not reference.add_branch_out_to_residual,
                   "dropout": reference.dropout.p > 0,
                   "a custom depth_residual_fn": getattr(reference.depth_residual_fn, "__name__", "") != "add"}
    refused = [what for what, present in unsupported.items() if present]
    if refused:
        raise ReslabError(f"reference uses {refused[0]}, which reslab's frac site does not compute; build it "
                          "with the package's defaults for that argument")
    check_variant(site, reference)


def check_variant(site: FracConnections, reference: nn.Module) -> None:
    """The activation must agree; a static site takes only a reference whose dynamic terms are exactly zero."""
    reference_tanh = isinstance(reference.act, nn.Tanh)
    if site.dynamic and reference_tanh != site.tanh:
        raise ReslabError(f"reference has tanh={reference_tanh}, the site frac_tanh={site.tanh}; set frac_tanh="
                          f"{str(reference_tanh).lower()}")
    if not site.dynamic and (reference.dynamic_alpha_fn.any() or reference.dynamic_beta_fn.any()):
        raise ReslabError("reference has non-zero dynamic weights, which a static site drops; build the site with "
                          "frac_dynamic=true")
