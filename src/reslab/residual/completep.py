import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from reslab.errors import ReslabError
from reslab.residual.base import ResidualSite, SiteSpec, check_integer_option, check_number_option


class CompleteP(ResidualSite):
    """CompleteP / depth-muP: `x = x + m^-alpha F(LN(x))`, `m = L / L_base`, with the matching init and AdamW rules.

    `completep_alpha` (default 1, CompleteP; 0.5 is depth-muP, Yang et al. 2023; 0 is the standard
    parametrisation) and `completep_base_layers` L_base (default 1, so the multiplier is `L^-alpha`: the depth the
    hyper-parameters were tuned at). As the authors' code, EleutherAI/nanoGPT-mup (model.py: `Block.forward`,
    `residual_scaling = 1 / depth_multiplier ** depth_alpha_exp`; `configure_optimizers`), at width multiplier 1:

    - every branch matrix is drawn from N(0, completep_init_std) (default 0.02, nanoGPT's sigma_base), with no depth
      factor: GPT-2's `1/sqrt(2L)` on the output projections is undone;
    - every parameter of a block (matrices, norm gains, biases, this scheme's own) trains at learning rate
      `lr * m^(alpha - 1)` and Adam epsilon `eps * m^-alpha`; embeddings, the final norm and the head keep `lr`, `eps`
      (`optimizer_scales`, read by the AdamW builder; `--optimizer muon` applies the branch scaling and the init,
      not these AdamW rules).

    Dey et al. 2025, Don't be lazy: CompleteP enables compute-efficient deep transformers (arXiv 2505.01618).
    """

    name = "completep"
    formula = "x = x + (L/L_base)^-alpha F(LN(x)),  block lr x (L/L_base)^(alpha-1)"
    paper = "Dey et al. 2025, CompleteP (arXiv 2505.01618)"
    additive_stream = True  # x_L = x_0 + sum of every scaled write: decomposable (reslab.lens)
    option_defaults = {"completep_alpha": 1.0, "completep_base_layers": 1, "completep_init_std": 0.02}

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.alpha = float(self.options["completep_alpha"])
        self.depth_multiplier = spec.num_layers / self.options["completep_base_layers"]
        self.branch_scale = self.depth_multiplier ** -self.alpha
        self.norm = spec.make_norm(spec.width)

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        check_integer_option(cls.name, options, "completep_base_layers", 1)
        check_number_option(cls.name, options, "completep_alpha", 0, 1)
        check_number_option(cls.name, options, "completep_init_std", 0, math.inf)
        return options

    @classmethod
    def check_model(cls, num_layers: int, given: Mapping[str, Any]) -> None:
        base = given.get("completep_base_layers", cls.option_defaults["completep_base_layers"])
        if "completep_alpha" in given and num_layers == base:
            raise ReslabError(f"--completep-alpha does not apply to a model of {num_layers} block"
                              f"{'s' * (num_layers != 1)}: residual scheme 'completep' scales by (L/L_base)^-alpha "
                              "and L = L_base makes it 1 (raise --layers or set completep_base_layers)")

    def forward(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        fx = self.branch_scale * sublayer(self.norm(x))
        out = x + fx
        self.observe(x, fx, out)
        return out

    def init_branch(self, sublayer: nn.Module) -> None:
        with torch.no_grad():
            for _, weight in sublayer.branch_weights():
                weight.normal_(0.0, self.options["completep_init_std"])

    def optimizer_scales(self) -> tuple[float, float]:
        return self.depth_multiplier ** (self.alpha - 1), self.depth_multiplier ** -self.alpha

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, branch x{self.branch_scale:.4g}"
