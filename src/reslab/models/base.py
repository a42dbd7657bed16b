"""What every reslab language model shares: weight init and generation (its typed config: `configs.py`).

The architectures themselves live one per file (`tiny.py`, `gpt.py`, `llama.py`) so each forward reads top-down.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.contracts import attention_sublayers, declared_parameters, is_moe
from reslab.models.configs import TransformerConfig
from reslab.nn import Block, make_norm
from reslab.residual import get_scheme


class LanguageModel(nn.Module):
    """Base of the transformer LMs: `forward(idx) -> ModelOutput`; subclasses build `blocks` and the rest, and
    provide what `reslab.contracts` declares (checked when the model is built)."""

    config_class: ClassVar[type[TransformerConfig]]
    blocks: nn.ModuleList
    aux_loss_weights: Mapping[str, float] = MappingProxyType({})  # a model with auxiliary losses sets its own

    def init_weights(self, scaled_residual_init: bool) -> None:
        """Normal(0, init_std) for every matrix and embedding, zero biases (GPT-2 / nanoGPT).

        With `scaled_residual_init`, the projections that write into the stream get std / sqrt(2L) (GPT-2 paper,
        section 2.3), so the stream's variance does not grow with depth. Then each residual site may impose its own
        branch init (DeepNet).
        """
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            for stack in declared_parameters(module, "stacked_matrices"):  # a stack of matrices (MoE experts)
                nn.init.normal_(stack, 0.0, std)
        for block in self.blocks:
            for site, sublayer in block.sites():
                if scaled_residual_init:
                    nn.init.normal_(sublayer.output_projection.weight, 0.0, std / math.sqrt(2 * len(self.blocks)))
                site.init_branch(sublayer)

    def build_rmsnorm_stack(self, sublayers: Callable[[int], tuple[nn.Module, nn.Module]]) -> None:
        """The Llama-style skeleton: token embedding (no positions), dropout, the scheme's stream adapter, one
        `Block` per layer from `sublayers(layer) -> (attention, FFN)`, a final RMSNorm (if the scheme has one) and
        the LM head, tied to the embedding with `config.tie_embeddings`."""
        config = self.config
        scheme = get_scheme(config.residual)
        norm = make_norm("rmsnorm", eps=config.norm_eps)
        self.tok_emb = nn.Embedding(config.vocab_size, config.width)
        self.drop = nn.Dropout(config.dropout)
        self.stream = scheme.stream_adapter(config.width, config.layers, config.residual_options)
        self.blocks = nn.ModuleList(Block(*sublayers(layer), scheme, layer, config.layers, config.width, norm,
                                          config.residual_options, config.vocab_size) for layer in range(config.layers))
        self.norm = norm(config.width) if scheme.final_norm else nn.Identity()
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def num_parameters(self, exclude_positions: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if exclude_positions and hasattr(self, "pos_emb"):
            total -= self.pos_emb.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), the PaLM / nanoGPT estimate:

        6 * N_matmul + 12 * L * (heads * head_dim) * T, where N_matmul counts the weights of every Linear layer (the
        LM head included, tied or not; embeddings, norms and biases excluded, being lookups or elementwise) plus the
        weights a token actually uses of modules that declare `active_weights()` (MoE experts: top-k of them), and
        the second term is the attention score and value matmuls over a context of T tokens (causal masking not
        halved).
        """
        seq_len = seq_len or self.config.context
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        matmul_weights += sum(m.active_weights() for m in self.modules() if hasattr(m, "active_weights"))
        attention = sum(12 * attn.heads * attn.head_dim * seq_len for attn in attention_sublayers(self))
        return 6.0 * matmul_weights + attention

    def update_balance(self, reduce=None) -> None:
        """Called by the trainer after each optimizer step: MoE layers move their routing bias from the step's
        expert counts (DeepSeek-V3's auxiliary-loss-free balancing; `reduce` sums the counts over ranks)."""
        for module in self.modules():
            if is_moe(module):
                module.update_bias(reduce)

    def residual_sites(self):
        """(block index, sublayer index, site) for every place a sublayer meets the stream."""
        for layer, block in enumerate(self.blocks):
            for index, (site, _) in enumerate(block.sites()):
                yield layer, index, site

    def check_length(self, seq_len: int) -> None:
        if seq_len > self.config.context:
            raise ValueError(f"sequence of {seq_len} tokens is longer than the model's context {self.config.context}")

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Autoregressive sampling from `idx` (batch, seq), cropping to the context window."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.context:]).logits[:, -1, :].float()
            if temperature <= 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
                next_id = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        return idx


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the top-k logits and the smallest set whose probability reaches top_p; the rest become -inf."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits
