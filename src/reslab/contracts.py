"""What reslab's parts promise each other, declared once: a model's typed output, the members trainers, probes,
optimizers, FSDP and FLOP counting rely on, and the parameter groups modules declare for the optimizer.

- Every language model returns a `ModelOutput`: logits, auxiliary losses by name (MoE load balancing, ...) that
  the trainer adds to the loss with their weights, and extra metrics to log.
- A language model provides `config`, `blocks` (an `nn.ModuleList`), `residual_sites()` and `flops_per_token()`;
  each block provides `sites()`, pairs of (residual site, sublayer); each sublayer provides `output_projection`
  (the linear map that writes into the stream: scaled init, DeepNet's branch init) and `branch_weights()`; an
  attention sublayer also provides `heads` and `head_dim` (for FLOPs). `check_language_model` verifies this once,
  when the model is built, and names the first missing member.
- Parameter groups are declared, not guessed: weight decay applies to the weights of `nn.Linear` and `nn.Embedding`
  and to parameters a module lists in `decayed_parameters`; Muon takes the `nn.Linear` weights inside the blocks,
  except those a module lists in `not_for_muon`. A 3-D parameter a module lists in `stacked_matrices` (MoE experts)
  is a stack of matrices: decayed, initialised like a Linear weight, and for Muon each matrix on its own.
  Everything else (norm gains, biases, residual coefficients) gets AdamW without decay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from reslab.errors import ReslabError


@dataclass
class ModelOutput:
    """What a language model's forward returns."""

    logits: torch.Tensor  # (batch, seq, vocab)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> scalar, added to the training loss
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> tensor, logged on log steps


MODEL_MEMBERS = ("config", "blocks", "residual_sites", "flops_per_token")
SUBLAYER_MEMBERS = ("output_projection", "branch_weights")
ATTENTION_MEMBERS = ("heads", "head_dim")


def check_language_model(model: nn.Module) -> None:
    """Raise one ReslabError line naming the first member of the contract that `model` does not provide."""
    name = type(model).__name__
    _require(model, MODEL_MEMBERS, name)
    if not isinstance(model.blocks, nn.ModuleList):
        raise ReslabError(f"{name}.blocks must be an nn.ModuleList of blocks, not {type(model.blocks).__name__}")
    for index, block in enumerate(model.blocks):
        _require(block, ("sites",), f"{name}.blocks[{index}]")
        for site, sublayer in block.sites():
            where = f"{name}.blocks[{index}] sublayer {type(sublayer).__name__}"
            _require(sublayer, SUBLAYER_MEMBERS, where)
            if getattr(sublayer, "is_attention", False):
                _require(sublayer, ATTENTION_MEMBERS, where)


def attention_sublayers(model: nn.Module) -> list[nn.Module]:
    """The attention sublayers of a language model (what FLOP counting needs their geometry of)."""
    return [sub for block in model.blocks for _, sub in block.sites() if getattr(sub, "is_attention", False)]


def _require(obj: object, members: tuple[str, ...], what: str) -> None:
    for member in members:
        if not hasattr(obj, member):
            raise ReslabError(f"{what} does not provide {member!r}, which reslab's trainers and probes need "
                              "(see reslab.contracts)")


@dataclass
class ParameterGroups:
    """The model's trainable parameters, each in model order, split the way the optimizers treat them."""

    decay: list[nn.Parameter]
    no_decay: list[nn.Parameter]
    muon: list[nn.Parameter]  # hidden matrices, or stacks of them (a subset of `decay`)


def _declared(module: nn.Module, declaration: str) -> set[int]:
    """Ids of the parameters a module names in `declaration`: its own parameters, or all parameters of a named
    submodule (a name it does not have at this size is skipped)."""
    ids = set()
    for name in getattr(module, declaration, ()):
        value = getattr(module, name, None)
        if isinstance(value, nn.Module):
            ids.update(id(p) for p in value.parameters())
        elif value is not None:
            ids.add(id(value))
    return ids


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
