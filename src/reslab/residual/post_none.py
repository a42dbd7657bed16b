import torch
import torch.nn as nn

from reslab.residual.base import ResidualSite, SiteSpec


class PostNoResidual(ResidualSite):
    """Post-LN with the skip removed: `x = LN(F(x))`.

    The honest "no residual" control for a post-LN model such as the TinyTransformer: the sublayer's output is
    kept and normalised, only `x +` is gone. (`none` is the same control for pre-LN models: `x = F(LN(x))`.)
    """

    name = "post-none"
    formula = "x = LN(F(x))"
    paper = "control for post-LN: the skip removed, the norm kept"
    final_norm = False
    has_skip = False

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.norm = spec.make_norm(spec.width)

    def forward(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        fx = sublayer(x)
        out = self.norm(fx)
        self.observe(x, fx, out)
        return out
