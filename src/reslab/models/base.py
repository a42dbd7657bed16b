"""What every reslab language model shares: its typed config, weight init and generation.

The architectures themselves live one per file (`tiny.py`, `gpt.py`, `llama.py`) so each forward reads top-down.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.checks import BETA, NON_NEGATIVE, POSITIVE, OnlyWith, Range, check_field_type, check_numbers
from reslab.contracts import attention_sublayers
from reslab.errors import ReslabError, check_positive
from reslab.nn import Block, make_norm
from reslab.residual import get_scheme


@dataclass
class ModelConfig:
    """Base for every model config: validation and (de)serialisation to plain JSON-able dicts.

    Every field is checked against its type annotation (so `--set layers=abc` or `layers=64.0` is one error line),
    and the float fields named in `RANGES` (merged over the class hierarchy) against their admissible range.
    """

    RANGES: ClassVar[dict[str, Range]] = {}
    # fields that matter only when another is set (`moe_top_k` needs `moe_experts`): a flag given for one of them
    # alone is refused, not ignored (reslab.cli_args)
    ONLY_WITH: ClassVar[dict[str, OnlyWith]] = {}

    def validate(self) -> None:
        pass

    @classmethod
    def declared(cls, name: str) -> dict[str, Any]:
        """A class-level declaration (`RANGES`, `ONLY_WITH`) merged over the class hierarchy, subclasses last."""
        merged: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get(name, {}))
        return merged

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(values) - names)
        if bad:
            raise ReslabError(f"{cls.__name__} has no field {bad[0]!r}; its fields: {', '.join(sorted(names))}")
        hints = typing.get_type_hints(cls)
        values = {name: check_field_type(name, value, hints[name]) for name, value in values.items()}
        ranges = cls.declared("RANGES")
        config = cls(**values)
        check_numbers(dataclasses.asdict(config), ranges, flags={name: name for name in ranges})
        config.validate()
        return config


@dataclass
class TransformerConfig(ModelConfig):
    """Fields every transformer in reslab understands. Shapes come from here, never from constants in code."""

    vocab_size: int = 65
    context: int = 64
    width: int = 64
    layers: int = 1
    heads: int = 2
    dropout: float = 0.0
    residual: str = "pre"
    residual_options: dict[str, Any] = field(default_factory=dict)
    init_std: float = 0.02

    RANGES: ClassVar[dict[str, Range]] = {"dropout": BETA, "init_std": NON_NEGATIVE, "norm_eps": POSITIVE,
                                          "rope_theta": POSITIVE}

    def validate(self) -> None:
        check_positive(vocab_size=self.vocab_size, context=self.context, width=self.width, layers=self.layers,
                       heads=self.heads)
        if self.width % self.heads:
            raise ReslabError(f"width {self.width} is not divisible by heads {self.heads}; "
                              f"choose heads among {divisors(self.width)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ReslabError(f"dropout must be in [0, 1), got {self.dropout}")
        get_scheme(self.residual).resolve_options(self.residual_options)


def divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)


class LanguageModel(nn.Module):
    """Base of the transformer LMs: `forward(idx) -> ModelOutput`; subclasses build `blocks` and the rest, and
    provide what `reslab.contracts` declares (checked when the model is built)."""

    config_class: ClassVar[type[TransformerConfig]]
    blocks: nn.ModuleList

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
            for name in getattr(module, "stacked_matrices", ()):  # a stack of matrices (MoE experts)
                nn.init.normal_(getattr(module, name), 0.0, std)
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
                                          config.residual_options) for layer in range(config.layers))
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
            if hasattr(module, "update_bias"):
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
