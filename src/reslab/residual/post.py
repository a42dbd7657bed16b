import torch
import torch.nn as nn

from reslab.residual.base import ResidualSite, SiteSpec


class PostLN(ResidualSite):
    """Post-LN: `x = LN(x + F(x))`, the original Transformer (Vaswani et al. 2017, arXiv 1706.03762).

    The stream is normalised after every sublayer, so it needs no final norm before the head. Known to need
    learning-rate warmup and to train badly when deep (Xiong et al. 2020, arXiv 2002.04745).
    """

    name = "post"
    formula = "x = LN(x + F(x))"
    paper = "Vaswani et al. 2017, Attention Is All You Need (arXiv 1706.03762)"
    final_norm = False

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.norm = spec.make_norm(spec.width)

    def forward(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        fx = sublayer(x)
        out = self.norm(x + fx)
        self.observe(x, fx, out)
        return out
