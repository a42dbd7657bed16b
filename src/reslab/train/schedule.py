"""Learning-rate schedule and optimizer construction."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from reslab.contracts import parameter_groups


def lr_at(step: int, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to `min_lr` at `steps` (nanoGPT's schedule)."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= steps:
        return min_lr
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay where modules declare it (`reslab.contracts.parameter_groups`: linear and embedding
    weights, not norms, biases or residual coefficients), fused where supported."""
    split = parameter_groups(model)
    groups = [{"params": split.decay, "weight_decay": weight_decay}, {"params": split.no_decay, "weight_decay": 0.0}]
    groups = scaled_groups(groups, block_scales(model), lr)
    # fused AdamW runs one kernel for all parameters (CUDA and, since torch 2.4, CPU); foreach is the fallback.
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=device.type != "cpu" or None)


ADAM_EPS = 1e-8  # torch's AdamW default


def block_scales(model: nn.Module) -> dict[int, tuple[float, float]]:
    """id(parameter) -> the (lr, eps) multipliers its block's residual sites declare
    (`ResidualSite.optimizer_scales`, CompleteP's depth rules), for the parameters whose block's are not (1, 1)."""
    scales: dict[int, tuple[float, float]] = {}
    for layer, _, site in getattr(model, "residual_sites", lambda: ())():
        scale = site.optimizer_scales()
        if scale != (1.0, 1.0):
            scales.update({id(p): scale for p in model.blocks[layer].parameters()})
    return scales


def scaled_groups(groups: list[dict], scales: dict[int, tuple[float, float]], lr: float) -> list[dict]:
    """Split each group by its parameters' multipliers; a scaled group carries `lr_scale` (the trainer's schedule
    multiplies by it every step) and its own `eps`. Without scales the groups are returned as they are."""
    if not scales:
        return groups
    split = []
    for group in groups:
        by_scale: dict[tuple[float, float], list] = {}
        for p in group["params"]:
            by_scale.setdefault(scales.get(id(p), (1.0, 1.0)), []).append(p)
        split += [{**group, "params": params, "lr": lr * lr_scale, "lr_scale": lr_scale, "eps": ADAM_EPS * eps_scale}
                  for (lr_scale, eps_scale), params in by_scale.items()]
    return split


def build_optimizer(config, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (default) or Muon for hidden matrices + AdamW for the rest (`--optimizer muon`)."""
    betas = (config.beta1, config.beta2)
    if config.optimizer == "muon":
        from reslab.train.muon import MuonAdamW

        return MuonAdamW(model, config.lr, config.muon_lr, config.weight_decay, betas)
    return build_adamw(model, config.lr, config.weight_decay, betas, device)
