"""Stand-ins for the two fairseq base classes the vendored `resi_dual_layers.py` extends (reslab's own code, not
upstream's): fairseq does not install on this Python, and ResiDual's layers only read attributes those bases set.

Each stand-in sets exactly the attributes ResiDual's `forward` reads, as fairseq's `__init__` sets them
(facebookresearch/fairseq `fairseq/modules/transformer_layer.py`, `TransformerEncoderLayerBase` and
`TransformerDecoderLayerBase`): LayerNorms of fairseq's default eps 1e-5 (`fairseq/modules/layer_norm.py`), `fc1`
and `fc2` Linears, ReLU (fairseq's default `activation_fn`), dropout modules, and the optional extras
(`c_attn`, `attn_ln`, `ffn_layernorm`, `w_resid`, cross-attention) off. The attention is torch's
`nn.MultiheadAttention` in fairseq's (time, batch, channel) layout behind fairseq's call signature.

The config is flat (`StandInConfig`), where fairseq's nests `cfg.decoder.embed_dim`; the layers only read
`cfg.enc_res_input_norm_scale` / `cfg.dec_res_input_norm_scale` from it.
"""

import types
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F


@dataclass
class StandInConfig:
    """What the stand-ins build from, plus ResiDual's four fields (`resi_dual/resi_dual.py:294-300`)."""

    embed_dim: int
    ffn_embed_dim: int
    attention_heads: int
    dropout: float = 0.0
    enc_alpha: float = 1.0
    dec_alpha: float = 1.0
    enc_res_input_norm_scale: float = 1.0
    dec_res_input_norm_scale: float = 1.0


class MultiheadAttention(nn.Module):
    """fairseq's `MultiheadAttention` call, `(query, key, value, ...) -> (out, weights)` on (T, B, C) tensors."""

    def __init__(self, embed_dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.attention = nn.MultiheadAttention(embed_dim, heads, dropout=dropout)
        self.num_heads, self.head_dim = heads, embed_dim // heads

    def forward(self, query, key, value, key_padding_mask=None, incremental_state=None, need_weights=True,
                static_kv=False, attn_mask=None, need_head_weights=False):
        out, _ = self.attention(query, key, value, key_padding_mask=key_padding_mask, need_weights=False,
                                attn_mask=attn_mask)
        return out, None

    def _get_input_buffer(self, incremental_state):
        return {}


def _common(layer: nn.Module, cfg: StandInConfig) -> None:
    """The attributes both of fairseq's layer bases set that ResiDual's layers read."""
    layer.embed_dim = cfg.embed_dim
    layer.self_attn = MultiheadAttention(cfg.embed_dim, cfg.attention_heads)
    layer.self_attn_layer_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-5)
    layer.dropout_module = nn.Dropout(cfg.dropout)
    layer.activation_fn = F.relu
    layer.activation_dropout_module = nn.Dropout(0.0)
    layer.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_embed_dim)
    layer.fc2 = nn.Linear(cfg.ffn_embed_dim, cfg.embed_dim)
    layer.final_layer_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-5)


class TransformerEncoderLayerBase(nn.Module):
    def __init__(self, cfg: StandInConfig, return_fc: bool = False):
        super().__init__()
        self.cfg, self.return_fc = cfg, return_fc
        _common(self, cfg)


class TransformerDecoderLayerBase(nn.Module):
    def __init__(self, cfg: StandInConfig, no_encoder_attn: bool = False, add_bias_kv: bool = False,
                 add_zero_attn: bool = False):
        super().__init__()
        _common(self, cfg)
        self.cross_self_attention = False
        self.nh, self.head_dim = self.self_attn.num_heads, self.self_attn.head_dim
        self.c_attn = self.attn_ln = self.ffn_layernorm = self.w_resid = None
        # cross-attention: a module of the right call when asked for (the converter refuses such a layer)
        self.encoder_attn = None if no_encoder_attn else MultiheadAttention(cfg.embed_dim, cfg.attention_heads)
        self.encoder_attn_layer_norm = None if no_encoder_attn else nn.LayerNorm(cfg.embed_dim, eps=1e-5)
        self.need_attn, self.onnx_trace = True, False


def modules() -> dict[str, types.ModuleType]:
    """`sys.modules` entries under which the vendored file's `from fairseq.modules.transformer_layer import ...`
    finds the stand-ins."""
    layer_module = types.ModuleType("fairseq.modules.transformer_layer")
    layer_module.TransformerEncoderLayerBase = TransformerEncoderLayerBase
    layer_module.TransformerDecoderLayerBase = TransformerDecoderLayerBase
    return {"fairseq": types.ModuleType("fairseq"), "fairseq.modules": types.ModuleType("fairseq.modules"),
            "fairseq.modules.transformer_layer": layer_module}
