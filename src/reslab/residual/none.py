import torch
import torch.nn as nn

from reslab.residual.base import ResidualSite, SiteSpec


class NoResidual(ResidualSite):
    """No skip at all: `x = F(LN(x))`.

    The norm is kept and only the skip removed, so an ablation against pre-LN isolates the skip itself.
    This is the control in every reslab ablation (not the TinyTransformer article's edit, which also discarded
    the sublayer outputs; see `reslab reproduce tiny-residual`).
    """

    name = "none"
    formula = "x = F(LN(x))"
    paper = "control: the skip removed, the norm kept"
    has_skip = False

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.norm = spec.make_norm(spec.width)

    def forward(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        out = sublayer(self.norm(x))
        self.observe(x, out, out)
        return out
