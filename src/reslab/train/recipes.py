"""Named training recipes: a model and its training flags, applied as defaults that explicit flags override."""

from __future__ import annotations

from typing import Any

from reslab.errors import unknown

# nanoGPT's model at its CPU size: GPT-2's architecture without biases, with the exact GELU.
NANOGPT_CPU_MODEL = {"layers": 4, "heads": 4, "width": 128, "context": 64, "bias": False, "dropout": 0.0,
                     "activation": "gelu"}

RECIPES: dict[str, dict[str, Any]] = {
    # nanoGPT's shakespeare-char recipe scaled for a CPU (its README): val 1.88 after 2000 iterations.
    "nanogpt-cpu": {
        "model": "gpt",
        "model_config": NANOGPT_CPU_MODEL,
        "train": {"batch": 12, "steps": 2000, "lr": 1e-3, "min_lr": 1e-4, "warmup": 100, "beta2": 0.99,
                  "weight_decay": 0.1, "grad_clip": 1.0, "eval_interval": 250, "eval_batches": 20},
    },
    # Issue 7's time to quality: the same model, Muon on the hidden matrices (modded-nanogpt), a larger batch and
    # fewer steps. Val <= 1.70 on tinyshakespeare in under 110 s of wall time on 2 CPU cores (BENCHMARKS.md).
    "fast": {
        "model": "gpt",
        "model_config": NANOGPT_CPU_MODEL,
        "train": {"batch": 24, "steps": 750, "optimizer": "muon", "lr": 2e-3, "muon_lr": 0.03, "min_lr": 2e-4,
                  "warmup": 35, "beta2": 0.99, "weight_decay": 0.1, "grad_clip": 1.0, "eval_interval": 250,
                  "eval_batches": 20},
    },
}


def get_recipe(name: str) -> dict[str, Any]:
    if name not in RECIPES:
        raise unknown("recipe", name, RECIPES)
    return RECIPES[name]
