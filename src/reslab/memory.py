"""Will it fit? A memory estimate made before a model is built, so a model too large is one line, not an
allocator error after trying to allocate hundreds of GB (or the kernel's OOM killer an hour later).

The estimate is deliberately simple and on the generous side of the truth:
    parameters P (counted on the meta device: no memory) x 16 bytes  fp32 weights, gradients, two AdamW moments
  + activations kept for backward, per layer  ~ 68 B x batch x context x width x streams  (fp32, after
    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models")
                                              + 10 B x batch x heads x context^2  (attention scores)
  + logits: 12 B x batch x context x vocab  (logits, their gradient, the fp32 copy for the loss)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from reslab._torch_compat import initialisers_skipped
from reslab.errors import ReslabError

GIB = 2**30


def parameter_count(model_name: str, model_config: dict[str, Any]) -> int:
    """Parameters of the model the config describes, built on the meta device (no memory is allocated) with its
    initialisers skipped: a meta tensor has no values to fill, and torch fills one through its Python reference
    kernels, whose first use imports torch._dynamo (seconds, at every run's start)."""
    from reslab.models import build_model

    with torch.device("meta"), initialisers_skipped():
        model = build_model(model_name, **model_config)
    return sum(p.numel() for p in model.parameters())



def training_bytes(model_name: str, model_config: dict[str, Any], batch: int = 0, micro_batches: int = 1) -> dict:
    """The estimate's parts in bytes: `state` (weights, gradients, optimizer) and `activations` at `batch`."""
    params = parameter_count(model_name, model_config)
    rows = batch // max(micro_batches, 1)
    activations = 0
    if rows and "width" in model_config:
        width, context = model_config["width"], model_config["context"]
        streams = stream_copies(model_config)
        per_layer = 68 * rows * context * width * streams + 10 * rows * model_config["heads"] * context**2
        activations = model_config["layers"] * per_layer + 12 * rows * context * model_config["vocab_size"]
    return {"parameters": params, "state": 16 * params, "activations": activations}


def stream_copies(model_config: dict[str, Any]) -> int:
    """How many copies of the (batch, seq, width) stream the model's residual scheme carries (hyper-connections: n)."""
    from reslab.residual import get_scheme

    residual = model_config.get("residual")
    return get_scheme(residual).streams(model_config.get("residual_options") or {}) if residual else 1


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this process on `device`: CUDA's free memory, or on CPU the smaller of the system's
    available memory and this cgroup's remaining limit. None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    sizes = [size for size in (_meminfo_available(), _cgroup_remaining()) if size is not None]
    return min(sizes) if sizes else None


def check_fits(model_name: str, model_config: dict[str, Any], config=None, device: torch.device | None = None) -> None:
    """Raise one ReslabError line, with the estimate, if the model (trained with `config`) cannot fit."""
    if os.environ.get("RESLAB_NO_MEMORY_CHECK"):
        return
    device = device or torch.device("cpu")
    batch = getattr(config, "batch", 0) if config is not None else 0
    parts = training_bytes(model_name, model_config, batch, getattr(config, "grad_accum", 1) if config else 1)
    if config is None:
        parts["state"] = 4 * parts["parameters"]  # only the weights (inference, `reslab info`)
    needed = parts["state"] + parts["activations"]
    free = available_bytes(device)
    if free is None or needed <= free:
        return
    what = f"{parts['parameters']:,} parameters need {parts['state'] / GIB:.1f} GiB"
    if parts["activations"]:
        what += f" and activations at batch {batch} {parts['activations'] / GIB:.1f} GiB"
    raise ReslabError(f"this model will not fit: {what}, but {device.type} has {free / GIB:.1f} GiB free; make it "
                      "smaller (--width, --layers, --vocab-size) or lower --batch / --context, or raise --grad-accum "
                      "(RESLAB_NO_MEMORY_CHECK=1 skips this check)")


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_remaining() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return int(limit) - used
    except (OSError, ValueError):
        return None
