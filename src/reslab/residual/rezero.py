import torch
import torch.nn as nn

from reslab.residual.base import ResidualSite, SiteSpec


class ReZero(ResidualSite):
    """ReZero: `x = x + a * F(x)`, one scalar `a` per sublayer, `a = 0` at init, no normalisation anywhere.

    Every block is the identity at init, so signal and gradient pass through any depth unchanged.
    Bachlechner et al. 2020, ReZero is All You Need (arXiv 2003.04887).
    """

    name = "rezero"
    formula = "x = x + a * F(x),  a = 0 at init"
    paper = "Bachlechner et al. 2020, ReZero is All You Need (arXiv 2003.04887)"
    additive_stream = True  # x_L = x_0 + sum of every F written: decomposable (reslab.lens)
    final_norm = False
    option_defaults = {"rezero_init": 0.0}

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.alpha = nn.Parameter(torch.tensor(float(self.options["rezero_init"])))

    def forward(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        fx = self.alpha * sublayer(x)
        out = x + fx
        self.observe(x, fx, out)
        return out
