"""Building blocks shared by the transformer models: norms, attention, feed-forward layers, RoPE, the block."""

from reslab.nn.attention import CausalSelfAttention
from reslab.nn.block import Block
from reslab.nn.ffn import ACTIVATIONS, MLP, ReluFFN, SwiGLU
from reslab.nn.norms import LayerNorm, RMSNorm, make_norm
from reslab.nn.rope import RotaryEmbedding

__all__ = [
    "ACTIVATIONS", "Block", "CausalSelfAttention", "LayerNorm", "MLP", "RMSNorm", "ReluFFN", "RotaryEmbedding",
    "SwiGLU", "make_norm",
]
