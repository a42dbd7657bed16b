import torch
import torch.nn as nn

from reslab.residual.base import ResidualSite, SiteSpec, deepnorm_constants, xavier_normal_


class DeepNorm(ResidualSite):
    """DeepNorm: `x = LN(alpha * x + F(x))`, post-LN with an up-weighted skip and a down-scaled branch init.

    Decoder-only constants: alpha = (2L)^(1/4); FFN, value and output projections initialised xavier-normal with
    gain beta = (8L)^(-1/4), query and key projections with gain 1. Trained 1000-layer transformers.
    Wang et al. 2022, DeepNet: Scaling Transformers to 1,000 Layers (arXiv 2203.00555).
    """

    name = "deepnorm"
    formula = "x = LN(alpha * x + F(x)),  alpha = (2L)^(1/4)"
    paper = "Wang et al. 2022, DeepNet (arXiv 2203.00555)"
    final_norm = False

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.alpha, self.beta = deepnorm_constants(spec.num_layers)
        self.norm = spec.make_norm(spec.width)

    def forward(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        fx = sublayer(x)
        out = self.norm(self.alpha * x + fx)
        self.observe(x, fx, out)
        return out

    def init_branch(self, sublayer: nn.Module) -> None:
        for role, weight in sublayer.branch_weights():
            xavier_normal_(weight, 1.0 if role in ("q", "k") else self.beta)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha:.4f}, beta={self.beta:.4f}"
