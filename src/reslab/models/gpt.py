"""GPT-2 (Radford et al. 2019): learned positions, pre-LN blocks of attention and a 4x GELU MLP, final LN,
optionally tied LM head, and GPT-2's scaled init of the projections that write into the residual stream.

Defaults are nanoGPT's CPU shakespeare-char shape (4 layers, 4 heads, width 128, context 64); GPT-2 small is
`layers=12, heads=12, width=768, context=1024, vocab_size=50257`.
"""

import torch
import torch.nn as nn

from reslab.contracts import ModelOutput
from reslab.models.base import LanguageModel
from reslab.models.configs import GPTConfig
from reslab.nn import MLP, Block, CausalSelfAttention, make_norm
from reslab.residual import get_scheme


class GPT(LanguageModel):
    config_class = GPTConfig

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        scheme = get_scheme(config.residual)
        norm = make_norm("layernorm", bias=config.bias, eps=config.norm_eps)
        self.tok_emb = nn.Embedding(config.vocab_size, config.width)
        self.pos_emb = nn.Embedding(config.context, config.width)
        self.drop = nn.Dropout(config.dropout)
        self.stream = scheme.stream_adapter(config.width, config.layers, config.residual_options)
        self.blocks = nn.ModuleList(
            Block(
                CausalSelfAttention(config.width, config.heads, bias=config.bias, dropout=config.dropout),
                MLP(config.width, 4 * config.width, config.bias, config.dropout, config.activation),
                scheme, layer, config.layers, config.width, norm, config.residual_options, config.vocab_size,
            )
            for layer in range(config.layers)
        )
        self.norm = norm(config.width) if scheme.final_norm else nn.Identity()
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.init_weights(scaled_residual_init=config.scaled_init)

    def forward(self, idx: torch.Tensor) -> ModelOutput:
        self.check_length(idx.shape[1])
        positions = torch.arange(idx.shape[1], device=idx.device)
        stream = self.stream.enter(self.drop(self.tok_emb(idx) + self.pos_emb(positions)), idx)
        for block in self.blocks:
            stream = block(stream)
        return ModelOutput(self.head(self.norm(self.stream.reduce(stream))))
