import torch
import torch.nn as nn

from reslab.residual.base import ResidualSite, SiteSpec


class SandwichLN(ResidualSite):
    """Sandwich-LN, also called Peri-LN: `x = x + LN2(F(LN1(x)))`, a second norm on the branch output bounds what
    it writes.

    Ding et al. 2021, CogView (arXiv 2105.13290); NormFormer (Shleifer et al. 2021, arXiv 2110.09456) is similar.
    Peri-LN (Kim et al. 2025, arXiv 2502.02732) is this formula, a norm on the input and the output of every
    sublayer, as in Gemma 2, 3 and 3n; `olmo2` is its output-only half.
    """

    name = "sandwich"
    formula = "x = x + LN2(F(LN1(x)))  (Peri-LN)"
    paper = "Ding et al. 2021, CogView (arXiv 2105.13290); Peri-LN, Kim et al. 2025 (arXiv 2502.02732)"
    additive_stream = True  # x_L = x_0 + sum of every F written: decomposable (reslab.lens)

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.norm_in = spec.make_norm(spec.width)
        self.norm_out = spec.make_norm(spec.width)

    def forward(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        fx = self.norm_out(sublayer(self.norm_in(x)))
        out = x + fx
        self.observe(x, fx, out)
        return out
