"""The Llama family as small models use it (MiniMind, Llama 2/3, Qwen3): RMSNorm, RoPE, grouped-query attention,
SwiGLU FFN, pre-norm, optional tied embeddings and optional per-head QK RMSNorm (Qwen3).

Touvron et al. 2023 (arXiv 2302.13971); Qwen3 technical report (arXiv 2505.09388) for QK-norm.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from reslab.errors import ReslabError, check_positive
from reslab.contracts import ModelOutput
from reslab.models.base import LanguageModel, TransformerConfig
from reslab.nn import Block, CausalSelfAttention, SwiGLU, make_norm
from reslab.residual import get_scheme


@dataclass
class LlamaConfig(TransformerConfig):
    width: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int | None = None  # None: width // heads
    ffn_hidden: int | None = None  # None: 8/3 * width rounded up to a multiple of 64 (MiniMind, Llama)
    rope_theta: float = 10000.0
    qk_norm: bool = False
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    residual: str = "pre"

    def validate(self) -> None:
        super().validate()
        check_positive(kv_heads=self.kv_heads, head_dim=self.head_dim, ffn_hidden=self.ffn_hidden,
                       rope_theta=self.rope_theta)
        if self.heads % self.kv_heads:
            choices = ", ".join(str(d) for d in range(1, self.heads + 1) if self.heads % d == 0)
            raise ReslabError(f"heads {self.heads} is not divisible by kv_heads {self.kv_heads}; "
                              f"choose kv_heads among {choices}")
        if (self.head_dim or self.width // self.heads) % 2:
            raise ReslabError(f"RoPE needs an even head dimension, got {self.head_dim or self.width // self.heads}; "
                              "change width, heads or head_dim")

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 64 * ((8 * self.width // 3 + 63) // 64)


class Llama(LanguageModel):
    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        scheme = get_scheme(config.residual)
        norm = make_norm("rmsnorm", eps=config.norm_eps)
        self.tok_emb = nn.Embedding(config.vocab_size, config.width)
        self.drop = nn.Dropout(config.dropout)
        self.stream = scheme.stream_adapter(config.width, config.layers, config.residual_options)
        self.blocks = nn.ModuleList(
            Block(
                CausalSelfAttention(
                    config.width, config.heads, config.kv_heads, config.head_dim, bias=False,
                    dropout=config.dropout, rope_theta=config.rope_theta, qk_norm=config.qk_norm,
                    norm_eps=config.norm_eps,
                ),
                SwiGLU(config.width, config.hidden, dropout=config.dropout),
                scheme, layer, config.layers, config.width, norm, config.residual_options,
            )
            for layer in range(config.layers)
        )
        self.norm = norm(config.width) if scheme.final_norm else nn.Identity()
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.init_weights(scaled_residual_init=False)

    def forward(self, idx: torch.Tensor) -> ModelOutput:
        stream = self.stream.widen(self.drop(self.tok_emb(idx)))
        for block in self.blocks:
            stream = block(stream)
        return ModelOutput(self.head(self.norm(self.stream.reduce(stream))))
