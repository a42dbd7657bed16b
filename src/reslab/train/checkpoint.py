"""Checkpoints as safetensors + JSON, written atomically; pickles are refused, never unpickled.

`checkpoint.safetensors` holds the model's tensors under `model.`, the optimizer's moments under `optimizer.` and
the RNG states under `rng.`; its metadata carries the scalar training state as JSON (the authoritative copy, written
in the same atomic rename as the tensors). `state.json` mirrors that state for people and tools.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from reslab.errors import ReslabError
from reslab.io import atomic_write, read_json, write_json

CHECKPOINT = "checkpoint.safetensors"
STATE = "state.json"
CONFIG = "config.json"


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without aliases (tied weights are stored once; safetensors refuses shared memory)."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load tensors saved by `model_tensors`, strictly: every key but the tied aliases must be present."""
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(model.state_dict()))
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise ReslabError(f"checkpoint does not match the model built from config.json ({what}); "
                          "was config.json edited or copied from another run?")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ReslabError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                              f"{tuple(expected[name].shape)}; config.json and checkpoint disagree")
    model.load_state_dict(tensors, strict=False)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    return tensors, {"param_groups": state["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    rng: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write checkpoint.safetensors then state.json, each atomically (temp file, fsync, rename)."""
    tensors = {f"model.{k}": v for k, v in model_tensors(model).items()}
    meta: dict[str, Any] = {"state": state}
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
    tensors.update({f"rng.{k}": v.contiguous().cpu() for k, v in rng.items()})
    metadata = {"format": "reslab-checkpoint-1", "meta": json.dumps(meta)}
    atomic_write(Path(run_dir) / CHECKPOINT, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    write_json(Path(run_dir) / STATE, state)


def check_safetensors(path: Path) -> None:
    """Refuse anything that is not a safetensors file, pickles first, before any byte of it is interpreted."""
    if not path.exists():
        raise ReslabError(f"no checkpoint at {path}; is this a reslab run directory?")
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        raise ReslabError(f"{path} is a pickle (torch.save) file; reslab loads only safetensors checkpoints, "
                          "since unpickling can run arbitrary code. Convert it with safetensors.torch.save_file")
    if len(head) < 9 or head[8:9] != b"{" or struct.unpack("<Q", head[:8])[0] > path.stat().st_size:
        raise ReslabError(f"{path} is not a safetensors file (truncated or another format)")


def read_checkpoint(path: Path, prefix: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a checkpoint; with `prefix` only the tensors under it, prefix removed."""
    check_safetensors(path)
    tensors = {}
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        for name in handle.keys():
            if prefix is None or name.startswith(prefix):
                tensors[name[len(prefix):] if prefix else name] = handle.get_tensor(name)
    return tensors, json.loads(metadata.get("meta", "{}"))


def read_run_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise ReslabError(f"{run_dir} is not a reslab run directory (no config.json)")
    return read_json(path)


def load_run_model(run_dir: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a run directory (weights from checkpoint.safetensors) and its config.json."""
    from reslab.models import build_model

    config = read_run_config(run_dir)
    model = build_model(config["model"], **config["model_config"])
    tensors, _ = read_checkpoint(Path(run_dir) / CHECKPOINT, prefix="model.")
    load_model_tensors(model, tensors)
    return model.to(device).eval(), config
