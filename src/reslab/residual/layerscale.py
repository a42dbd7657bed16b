import torch
import torch.nn as nn

from reslab.residual.base import ResidualSite, SiteSpec, layerscale_default_init


class LayerScale(ResidualSite):
    """LayerScale: `x = x + diag(l) * F(LN(x))`, a learned scale per channel on each branch.

    Init 0.1 up to depth 18, 1e-5 at 24, 1e-6 deeper (option `layerscale_init` overrides).
    Touvron et al. 2021, Going deeper with Image Transformers / CaiT (arXiv 2103.17239).
    """

    name = "layerscale"
    formula = "x = x + diag(l) * F(LN(x))"
    paper = "Touvron et al. 2021, CaiT (arXiv 2103.17239)"
    additive_stream = True  # x_L = x_0 + sum of every F written: decomposable (reslab.lens)
    option_defaults = {"layerscale_init": None}  # None: CaiT's rule by depth

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        init = self.options["layerscale_init"]
        if init is None:
            init = layerscale_default_init(spec.num_layers)
        self.norm = spec.make_norm(spec.width)
        self.scale = nn.Parameter(torch.full((spec.width,), float(init)))

    def forward(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        fx = self.scale * sublayer(self.norm(x))
        out = x + fx
        self.observe(x, fx, out)
        return out
