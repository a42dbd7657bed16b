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
    # fused AdamW runs one kernel for all parameters (CUDA and, since torch 2.4, CPU); foreach is the fallback.
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=device.type != "cpu" or None)


def build_optimizer(config, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (default) or Muon for hidden matrices + AdamW for the rest (`--optimizer muon`)."""
    betas = (config.beta1, config.beta2)
    if config.optimizer == "muon":
        from reslab.train.muon import MuonAdamW

        return MuonAdamW(model, config.lr, config.muon_lr, config.weight_decay, betas)
    return build_adamw(model, config.lr, config.weight_decay, betas, device)
