import torch
import torch.nn as nn

from reslab.residual.base import ResidualSite, SiteSpec


class Olmo2Norm(ResidualSite):
    """OLMo-2's reordered norm: `x = x + LN(F(x))`, the norm on the sublayer's output and none on its input.

    The sublayer reads the raw stream (the first one the raw embedding); what it writes is normalised before the
    add, so no write can grow the stream without bound; a final norm before the head. The output-only half of
    Peri-LN (`sandwich`). OLMo 2 (Team OLMo et al. 2024, 2 OLMo 2 Furious, arXiv 2501.00656), shipped as
    transformers' `Olmo2DecoderLayer` (models/olmo2/modeling_olmo2.py: `hidden_states = residual +
    post_attention_layernorm(self_attn(hidden_states))`, the same with `post_feedforward_layernorm` and the MLP).
    """

    name = "olmo2"
    formula = "x = x + LN(F(x))"
    paper = "Team OLMo et al. 2024, 2 OLMo 2 Furious (arXiv 2501.00656)"
    additive_stream = True  # x_L = x_0 + sum of every normalised write: decomposable (reslab.lens)

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.norm = spec.make_norm(spec.width)

    def forward(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        fx = self.norm(sublayer(x))
        out = x + fx
        self.observe(x, fx, out)
        return out
