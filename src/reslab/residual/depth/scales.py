import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from reslab.residual.base import ResidualSite, check_number_option
from reslab.residual.depth.base import Connection


class ResidualScales(Connection):
    """The speedrun's learned residual and branch scales: `x = a x + b F(LN(x))`, one `a` and one `b` per sublayer.

    modded-nanogpt at HEAD (`train_gpt.py @f411b3d`, lines 1334-1338 and 1634-1640, 1663-1665) keeps
    `resid_lambdas` a, shape (layers, 2), each initialised to sqrt(1.1) so that a block multiplies the stream by 1.1
    (record #45, 11/18/25: unrolled, block i's write is scaled by a^(L-i)), and `post_lambdas` b, shape
    (layers, 2), initialised to 1. Replaces pre-LN's update, so it composes with `pre` only; `scales_resid_init`
    and `scales_branch_init` set the two inits (1 and 1: pre-LN exactly).
    """

    name = "scales"
    formula = "x = a_i x + b_i F(LN(x))"
    paper = "Jordan et al. 2024-26, modded-nanogpt speedrun records #45 (2025-11-18), train_gpt.py @f411b3d"
    reference = "KellerJordan/modded-nanogpt @f411b3d train_gpt.py:1334-1338,1634-1640,1663-1665"
    kind = "scaled"  # the audit reads a x + b F as a scaled residual
    option_defaults = {"scales_resid_init": math.sqrt(1.1), "scales_branch_init": 1.0}
    replaces_update = True

    def __init__(self, spec, options: Mapping[str, Any]):
        super().__init__(spec, options)
        self.resid = nn.Parameter(torch.tensor(float(options["scales_resid_init"])))
        self.branch = nn.Parameter(torch.tensor(float(options["scales_branch_init"])))

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        for key in cls.option_defaults:
            check_number_option(cls.name, options, key, -10.0, 10.0)
        return options

    static = True  # a and b are parameters

    def update(self, site: ResidualSite, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        fx = sublayer(site.norm(x))
        out = self.resid * x + self.branch * fx
        site.observe(x, fx, out)
        return out

    def coefficients(self) -> dict[str, Any]:
        return {"a": self.resid.item(), "b": self.branch.item()}
