"""Muon for the hidden matrices, AdamW for everything else, in one optimizer.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; used by modded-nanogpt)
replaces each 2-D weight's momentum update by its nearest semi-orthogonal matrix, computed with a few Newton-Schulz
iterations, so every direction of the update moves at the same rate. Embeddings, the LM head, norms, biases and
scalar gates stay on AdamW, as the method prescribes.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

# Quintic Newton-Schulz coefficients chosen (by Muon's authors) to push singular values towards 1 fast, not exactly.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@torch.no_grad()
def orthogonalize(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T of update = U S V^T, by Newton-Schulz iteration in bf16-friendly arithmetic."""
    a, b, c = NS_COEFFICIENTS
    x = update.float()
    transposed = x.shape[0] > x.shape[1]
    if transposed:  # iterate on the wide orientation: x x^T is the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1, so the iteration converges
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if transposed else x).to(update.dtype)


def muon_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices for Muon, everything else for AdamW). Hidden = 2-D weights inside the blocks."""
    hidden, other = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (hidden if param.dim() == 2 and ".blocks." in f".{name}" else other).append(param)
    return hidden, other


class MuonAdamW(torch.optim.Optimizer):
    """Param groups carry `kind`: "muon" (momentum, Newton-Schulz, scaled step) or "adamw"."""

    def __init__(self, model: nn.Module, lr: float, muon_lr: float, weight_decay: float,
                 betas: tuple[float, float], momentum: float = 0.95, eps: float = 1e-8):
        hidden, other = muon_parameters(model)
        decay = [p for p in other if p.dim() >= 2]
        no_decay = [p for p in other if p.dim() < 2]
        groups = [
            {"params": hidden, "kind": "muon", "lr": muon_lr, "lr_scale": muon_lr / lr, "weight_decay": weight_decay},
            {"params": decay, "kind": "adamw", "lr": lr, "lr_scale": 1.0, "weight_decay": weight_decay},
            {"params": no_decay, "kind": "adamw", "lr": lr, "lr_scale": 1.0, "weight_decay": 0.0},
        ]
        super().__init__([g for g in groups if g["params"]], {"betas": betas, "momentum": momentum, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon(group)
            else:
                self._adamw(group)

    def _muon(self, group: dict) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffer = state["momentum_buffer"]
            buffer.lerp_(p.grad, 1 - group["momentum"])
            update = orthogonalize(p.grad.lerp(buffer, group["momentum"]))  # Nesterov
            # Scale so the update's RMS matches across shapes: tall matrices get sqrt(rows / cols).
            scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-group["lr"] * scale)

    def _adamw(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros(())
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step = state["step"].item()
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** step))
