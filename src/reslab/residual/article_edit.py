import torch
import torch.nn as nn

from reslab.residual.base import ResidualSite, SiteSpec


class ArticleEdit(ResidualSite):
    """The TinyTransformer article's "no residual" edit, kept as a cautionary reproduction: `x = LN(x)`.

    Deleting the line `x = x + output` from a post-LN block leaves `output = F(x)` computed and discarded, and
    `x = norm(x)` normalising the unchanged stream. So the edit removes the sublayers, not just the skip: the model
    becomes embeddings -> norms -> head, a bigram model. `reslab audit` reports its sublayers as dead. The honest
    post-LN control is `post-none` (`x = LN(F(x))`); for pre-LN models it is `none` (`x = F(LN(x))`).
    """

    name = "article-edit"
    formula = "x = LN(x)   (F(x) computed, then discarded)"
    paper = "the TinyTransformer article's ablation, reproduced to show its mistake"
    final_norm = False
    has_skip = False

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.norm = spec.make_norm(spec.width)

    def forward(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        fx = sublayer(x)  # computed, as in the article, and then never used
        out = self.norm(x)
        self.observe(x, fx, out)
        return out
