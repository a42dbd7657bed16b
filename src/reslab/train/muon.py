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
from torch.optim.adamw import adamw

from reslab._torch_compat import bf16_supported, foreach_add_, foreach_lerp, foreach_lerp_, foreach_mul_
from reslab.contracts import parameter_groups

# Quintic Newton-Schulz coefficients chosen (by Muon's authors) to push singular values towards 1 fast, not exactly.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@torch.no_grad()
def orthogonalize_batch(updates: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately U V^T of each matrix in a (n, rows, cols) stack, by Newton-Schulz iteration in `dtype`.

    The iteration only pushes singular values into roughly [0.7, 1.2], so bf16 arithmetic is accurate enough
    (Muon's reference implementation runs it in bf16); one batched matmul per stage serves the whole stack.
    """
    a, b, c = NS_COEFFICIENTS
    x = updates.to(dtype)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:  # iterate on the wide orientation: x x^T is the smaller Gram matrix
        x = x.mT
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + 1e-7)  # spectral <= Frobenius <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G G) x
    return (x.mT if transposed else x).to(updates.dtype)


def orthogonalize(update: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One matrix: `orthogonalize_batch` of a stack of one."""
    return orthogonalize_batch(update.unsqueeze(0), steps, dtype).squeeze(0)


def muon_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices for Muon, other decayed parameters, undecayed ones), as the modules declare them
    (`reslab.contracts.parameter_groups`): hidden = the nn.Linear weights inside the blocks, less `not_for_muon`."""
    split = parameter_groups(model)
    muon = {id(p) for p in split.muon}
    return split.muon, [p for p in split.decay if id(p) not in muon], split.no_decay


class MuonAdamW(torch.optim.Optimizer):
    """Param groups carry `kind`: "muon" (momentum, Newton-Schulz, scaled step) or "adamw" (torch's fused AdamW).

    Muon's matrices are orthogonalised in stacks of equal shape (all blocks' qkv together, and so on), in `ns_dtype`;
    by default bf16 where the hardware has native bf16 matmuls, fp32 elsewhere.
    """

    def __init__(self, model: nn.Module, lr: float, muon_lr: float, weight_decay: float,
                 betas: tuple[float, float], momentum: float = 0.95, eps: float = 1e-8,
                 ns_dtype: torch.dtype | None = None):
        self.ns_dtype = ns_dtype
        hidden, decay, no_decay = muon_parameters(model)
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
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        ns_dtype = self.ns_dtype
        if ns_dtype is None:
            ns_dtype = self.ns_dtype = torch.bfloat16 if bf16_supported(params[0].device) else torch.float32
        grads = [p.grad for p in params]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        foreach_lerp_(buffers, grads, 1 - group["momentum"])
        updates = foreach_lerp(grads, buffers, group["momentum"])  # Nesterov
        foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        by_shape: dict[torch.Size, list[int]] = {}
        for i, p in enumerate(params):  # a 3-D parameter (stacked MoE experts) is a batch of its matrices
            by_shape.setdefault(p.shape[-2:], []).append(i)
        for shape, members in by_shape.items():
            stack = orthogonalize_batch(torch.cat([updates[i].view(-1, *shape) for i in members]), dtype=ns_dtype)
            # Scale so the update's RMS matches across shapes: tall matrices get sqrt(rows / cols).
            scale = math.sqrt(max(1.0, shape[0] / shape[1]))
            parts = stack.split([params[i].numel() // shape.numel() for i in members])
            foreach_add_([params[i] for i in members], [part.view_as(params[i]) for i, part in zip(members, parts)],
                         alpha=-group["lr"] * scale)

    def _adamw(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [], [s["step"] for s in states], fused=params[0].device.type in ("cpu", "cuda"), amsgrad=False,
            beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=False,
        )
