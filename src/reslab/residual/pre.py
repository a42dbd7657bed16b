import torch
import torch.nn as nn

from reslab.residual.base import ResidualSite, SiteSpec


class PreLN(ResidualSite):
    """Pre-LN: `x = x + F(LN(x))`, with a final LN before the head.

    GPT-2 (Radford et al. 2019), analysed by Xiong et al. 2020 (arXiv 2002.04745); used by nanoGPT,
    LLMs-from-scratch, MiniMind, Llama and DeepSeek. The identity path runs untouched from embedding to head.
    """

    name = "pre"
    formula = "x = x + F(LN(x))"
    paper = "Xiong et al. 2020, On Layer Normalization in the Transformer Architecture (arXiv 2002.04745)"
    additive_stream = True  # x_L = x_0 + sum of every F written: decomposable (reslab.lens)

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.norm = spec.make_norm(spec.width)

    def forward(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        fx = sublayer(self.norm(x))
        out = x + fx
        self.observe(x, fx, out)
        return out
