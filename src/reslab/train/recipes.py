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
    # GPT-2 small (124M) as llm.c trains it: the baseline modded-nanogpt's speedrun started from (its record 1: 45 min
    # on 8xH100 to FineWeb val 3.28; README and records/track_1_short/2024-10-13_llmc: 10.26B tokens, val 3.2722).
    # llm.c's command (github.com/karpathy/llm.c/discussions/481):
    #   train_gpt2cu -e d12 -b 64 -t 1024 -d 524288 -l 0.0006 -q 0.0 -u 700 -c 0.1 -v 250
    # 12 layers, 12 heads, width 768, context 1024, biases, GELU (tanh); 524,288 tokens a step (512 x 1024), AdamW
    # lr 6e-4 (betas 0.9/0.95, clip 1.0), 700 warmup steps, cosine to 0, weight decay 0.1; 19,560 steps = 10.26B
    # tokens. For a GPU and a FineWeb-style prepared directory (modded-nanogpt's fineweb10B/ shards, or `reslab data
    # prepare --tokenizer gpt2`): the vocabulary is the data's (50,257). grad_accum 8 is llm.c's micro-batch of 64 on
    # one GPU (llm.c runs 8 GPUs x 64); lower it on larger memory, raise it on smaller (the curve is the same).
    "gpt2-124m": {
        "model": "gpt",
        "model_config": {"layers": 12, "heads": 12, "width": 768, "context": 1024, "bias": True, "dropout": 0.0,
                         "activation": "gelu-tanh"},
        "train": {"batch": 512, "grad_accum": 8, "steps": 19560, "lr": 6e-4, "min_lr": 0.0, "warmup": 700,
                  "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.1, "grad_clip": 1.0, "eval_interval": 250,
                  "eval_batches": 20},
    },
}


def get_recipe(name: str) -> dict[str, Any]:
    if name not in RECIPES:
        raise unknown("recipe", name, RECIPES)
    return RECIPES[name]
