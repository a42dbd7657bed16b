"""What reslab's parts promise each other, declared once: a model's typed output, the members trainers, probes,
optimizers, FSDP, FLOP counting and the lens rely on (each a `typing.Protocol` below, each member written once, in
its protocol), the optional hooks a residual scheme may need of a sublayer (capabilities), and the parameter groups
modules declare for the optimizer.

- Every language model returns a `ModelOutput`: logits, auxiliary losses by name (MoE load balancing, ...) that
  the trainer adds to the loss with their weights, and extra metrics to log.
- `check_language_model` verifies a model against `LanguageModel`, its blocks against `Block` and each sublayer
  against the protocol of its role (`Attention` when it sets `is_attention`, `MoELayer` when it sets `is_moe`, else
  `Sublayer`) once, when the model is built, and names the first missing member in one line.
- A capability is a protocol for an optional hook (`ValueMixing`): a scheme that needs it `require`s it of the
  sublayer at build, so a model without it is refused in one line instead of silently running another formula.
- Parameter groups are declared, not guessed: weight decay applies to the weights of `nn.Linear` and `nn.Embedding`
  and to parameters a module lists in `decayed_parameters`; Muon takes the `nn.Linear` weights inside the blocks,
  except those a module lists in `not_for_muon`. A 3-D parameter a module lists in `stacked_matrices` (MoE experts)
  is a stack of matrices: decayed, initialised like a Linear weight, and for Muon each matrix on its own.
  Everything else (norm gains, biases, residual coefficients) gets AdamW without decay. A name that is not an
  attribute of its module is an error at build (None: absent at this size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn as nn

from reslab.errors import ReslabError


@dataclass
class ModelOutput:
    """What a language model's forward returns."""

    logits: torch.Tensor  # (batch, seq, vocab)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> scalar, added to the training loss
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> tensor, logged on log steps


class Sublayer(Protocol):
    """What a residual site's sublayer (attention, feed-forward, mixture of experts) provides."""

    # the linear map that writes into the stream (GPT-2's scaled init reads its `weight`)
    output_projection: nn.Module

    def branch_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The branch's weight matrices by role ("q", "k", "v", "out", "ffn", ...), for schemes that set their init."""
        ...


class Attention(Sublayer, Protocol):
    """An attention sublayer: its geometry, for FLOP counting and for schemes that work per head."""

    is_attention: ClassVar[bool]  # True: the role flag
    heads: int
    head_dim: float
    kv_heads: int


class MoELayer(Sublayer, Protocol):
    """A mixture-of-experts sublayer whose routing bias the trainer moves after each optimizer step."""

    is_moe: ClassVar[bool]  # True: the role flag

    def update_bias(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Move the routing bias from the step's expert counts (`reduce` sums them over ranks)."""
        ...


class ValueMixing(Protocol):
    """Capability: attention whose values (batch, kv_heads, seq, head_dim) a residual scheme may replace before they
    are attended (ResFormer's value residual). None: the values are used as computed."""

    value_mix: Callable[[torch.Tensor], torch.Tensor] | None


class Block(Protocol):
    def sites(self) -> list[tuple[Any, nn.Module]]:
        """(residual site, sublayer) pairs, in forward order."""
        ...


class LanguageModel(Protocol):
    """What trainers, probes, FLOP counting and FSDP read of a language model."""

    config: Any
    blocks: nn.ModuleList  # of `Block`s
    aux_loss_weights: Mapping[str, float]  # auxiliary loss name -> its weight in the training loss

    def residual_sites(self) -> Iterator[tuple[int, int, nn.Module]]:
        """(block index, sublayer index, site) for every place a sublayer meets the stream."""
        ...

    def flops_per_token(self, seq_len: int | None = None) -> float: ...

    def update_balance(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Called after each optimizer step: every `MoELayer` updates its routing bias."""
        ...


class LensModel(LanguageModel, Protocol):
    """What the lens decodes a stream with: the model's stream adapter, final norm and head."""

    stream: nn.Module  # a `reslab.residual.StreamAdapter`: `reduce` turns the carried stream into one
    norm: nn.Module
    head: nn.Module


def members(protocol: type) -> tuple[str, ...]:
    """The members a protocol declares, its own first, then its protocol bases', each in declaration order."""
    names: dict[str, None] = {}
    for klass in protocol.__mro__:
        if getattr(klass, "_is_protocol", False) and klass is not Protocol:
            declared = [*vars(klass).get("__annotations__", {}), *vars(klass)]
            names.update((name, None) for name in declared if not name.startswith("_"))
    return tuple(names)


def missing(obj: object, protocol: type) -> str | None:
    """The first member of `protocol` that `obj` lacks, or None."""
    return next((name for name in members(protocol) if not hasattr(obj, name)), None)


def require(obj: object, protocol: type, what: str, needed_by: str = "reslab's trainers and probes") -> None:
    """Raise one ReslabError line if `obj` (described by `what`) lacks a member of `protocol`."""
    member = missing(obj, protocol)
    if member is not None:
        raise ReslabError(f"{what} does not provide {member!r} ({protocol.__name__}), needed by {needed_by} "
                          "(see reslab.contracts)")


def is_attention(sublayer: object) -> bool:
    return getattr(sublayer, "is_attention", False) is True


def is_moe(module: object) -> bool:
    return getattr(module, "is_moe", False) is True


def role(sublayer: object) -> type:
    """The protocol a sublayer promises, by its role flag."""
    return Attention if is_attention(sublayer) else MoELayer if is_moe(sublayer) else Sublayer


def check_language_model(model: nn.Module) -> None:
    """Raise one ReslabError line naming the first member of the contract that `model` does not provide, or the
    first parameter declaration (`decayed_parameters`, ...) that names what its module does not have."""
    name = type(model).__name__
    require(model, LanguageModel, name)
    if not isinstance(model.blocks, nn.ModuleList):
        raise ReslabError(f"{name}.blocks must be an nn.ModuleList of blocks, not {type(model.blocks).__name__}")
    for index, block in enumerate(model.blocks):
        require(block, Block, f"{name}.blocks[{index}]")
        for _, sublayer in block.sites():
            require(sublayer, role(sublayer), f"{name}.blocks[{index}] sublayer {type(sublayer).__name__}")
    for module in model.modules():
        for declaration in DECLARATIONS:
            _declared(module, declaration)


def attention_sublayers(model: nn.Module) -> list[nn.Module]:
    """The attention sublayers of a language model (what FLOP counting needs their geometry of)."""
    return [sub for block in model.blocks for _, sub in block.sites() if is_attention(sub)]


@dataclass
class ParameterGroups:
    """The model's trainable parameters, each in model order, split the way the optimizers treat them."""

    decay: list[nn.Parameter]
    no_decay: list[nn.Parameter]
    muon: list[nn.Parameter]  # hidden matrices, or stacks of them (a subset of `decay`)


DECLARATIONS = ("decayed_parameters", "not_for_muon", "stacked_matrices")  # class attributes: names of parameters


def declared_parameters(module: nn.Module, declaration: str) -> list[torch.Tensor]:
    """The parameters a module names in one of the `DECLARATIONS`: its own parameters, or all parameters of a named
    submodule; a name set to None is absent at this size, a name it does not have at all is an error."""
    found: list[torch.Tensor] = []
    for name in getattr(module, declaration, ()):
        if not hasattr(module, name):
            raise ReslabError(f"{type(module).__name__}.{declaration} names {name!r}, which it does not have; name "
                              "one of its parameters or submodules (set it to None where it is absent at this size)")
        value = getattr(module, name)
        found += list(value.parameters()) if isinstance(value, nn.Module) else [] if value is None else [value]
    return found


def _declared(module: nn.Module, declaration: str) -> set[int]:
    return {id(p) for p in declared_parameters(module, declaration)}


def parameter_groups(model: nn.Module) -> ParameterGroups:
    """Group parameters by what their modules declare (see the module docstring); no shape or name guessing."""
    decayed: set[int] = set()
    excluded_from_muon: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            decayed.add(id(module.weight))
        decayed.update(_declared(module, "decayed_parameters") | _declared(module, "stacked_matrices"))
        excluded_from_muon.update(_declared(module, "not_for_muon"))
    hidden: set[int] = set()
    for block in getattr(model, "blocks", ()):
        hidden.update(id(m.weight) for m in block.modules() if isinstance(m, nn.Linear))
        for module in block.modules():
            hidden.update(_declared(module, "stacked_matrices"))
    params = [p for p in model.parameters() if p.requires_grad]
    return ParameterGroups(
        decay=[p for p in params if id(p) in decayed],
        no_decay=[p for p in params if id(p) not in decayed],
        muon=[p for p in params if id(p) in hidden and id(p) not in excluded_from_muon],
    )
