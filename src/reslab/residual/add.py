import torch
import torch.nn as nn

from reslab.residual.base import ResidualSite, SiteSpec


class PlainAdd(ResidualSite):
    """The bare shortcut `x = x + F(x)`, no norm: ResNet's identity shortcut and the deep MLP of
    LLMs-from-scratch ch. 4. He et al. 2016, Deep Residual Learning for Image Recognition (arXiv 1512.03385).
    """

    name = "add"
    formula = "x = x + F(x)"
    paper = "He et al. 2016, Deep Residual Learning (arXiv 1512.03385)"
    additive_stream = True  # x_L = x_0 + sum of every F written: decomposable (reslab.lens)
    final_norm = False

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)

    def forward(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        fx = sublayer(x)
        out = x + fx
        self.observe(x, fx, out)
        return out
