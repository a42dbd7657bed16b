"""TinyTransformer: the one-block, char-level model of the article reslab's mission starts from.

Char embedding + learned positions, blocks of multi-head attention and a ReLU FFN (width -> 2*width -> width),
post-LN by default (as in the article), a linear LM head. Defaults: context 64, width 64, 2 heads, 1 block.
"""

import torch
import torch.nn as nn

from reslab.contracts import ModelOutput
from reslab.models.base import LanguageModel
from reslab.models.configs import TinyConfig
from reslab.nn import Block, CausalSelfAttention, ReluFFN, make_norm
from reslab.residual import get_scheme


class TinyTransformer(LanguageModel):
    config_class = TinyConfig

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        scheme = get_scheme(config.residual)
        norm = make_norm("layernorm", bias=config.bias)
        self.tok_emb = nn.Embedding(config.vocab_size, config.width)
        self.pos_emb = nn.Embedding(config.context, config.width)
        self.stream = scheme.stream_adapter(config.width, config.layers, config.residual_options)
        self.blocks = nn.ModuleList(
            Block(
                CausalSelfAttention(config.width, config.heads, bias=config.bias, dropout=config.dropout),
                ReluFFN(config.width, config.ffn_mult * config.width, bias=config.bias, dropout=config.dropout),
                scheme, layer, config.layers, config.width, norm, config.residual_options, config.vocab_size,
            )
            for layer in range(config.layers)
        )
        self.norm = norm(config.width) if scheme.final_norm else nn.Identity()
        self.head = nn.Linear(config.width, config.vocab_size, bias=config.bias)
        self.init_weights(scaled_residual_init=False)

    def forward(self, idx: torch.Tensor) -> ModelOutput:
        self.check_length(idx.shape[1])
        positions = torch.arange(idx.shape[1], device=idx.device)
        stream = self.stream.enter(self.tok_emb(idx) + self.pos_emb(positions), idx)
        for block in self.blocks:
            stream = block(stream)
        return ModelOutput(self.head(self.norm(self.stream.reduce(stream))))
