"""Checkpoints as safetensors + JSON, written atomically; pickles are refused, never unpickled.

`checkpoint.safetensors` holds the model's tensors under `model.`, the optimizer's moments under `optimizer.` and
the RNG states under `rng.`; its metadata carries the scalar training state as JSON (the authoritative copy, written
in the same atomic rename as the tensors). `state.json` mirrors that state for people and tools.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from reslab.errors import ReslabError
from reslab.io import atomic_write, write_json
from reslab.rundir import CHECKPOINT, CONFIG, STATE, DamagedRunError, RunDir

__all__ = ["CHECKPOINT", "CONFIG", "STATE", "load_run_model", "read_checkpoint", "save_checkpoint"]


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


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path | str = "checkpoint") -> None:
    """Load tensors saved by `model_tensors`, strictly: every key but the tied aliases, each shape and dtype."""
    check_model_tensors(tensors, model_tensors(model), source)
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
    atomic_write(Path(run_dir) / CHECKPOINT, lambda tmp: _save_file(tensors, tmp, metadata))
    write_json(Path(run_dir) / STATE, state)


def _save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, whose I/O failures (a full disk, a file size limit) become the OSError they are."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as error:
        found = re.search(r"os error (\d+)", str(error))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def check_safetensors(path: Path) -> None:
    """Refuse anything that is not a safetensors file, pickles first, before any byte of it is interpreted.

    A safetensors file starts with its header length (u64, little-endian) and then the header's `{`; that
    structure is checked first, so a header length whose low byte happens to be 0x80 (a pickle's first byte) is
    not mistaken for a pickle.
    """
    if not path.exists():
        raise ReslabError(f"no checkpoint at {path}: the run has not written one yet, or it was removed")
    if not path.is_file():
        raise ReslabError(f"{path} is not a file; a checkpoint is one safetensors file")
    with open(path, "rb") as handle:
        head = handle.read(9)
    size = path.stat().st_size
    if len(head) == 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= size - 8:
        return
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        raise ReslabError(f"{path} is a pickle (torch.save) file; reslab loads only safetensors checkpoints, "
                          "since unpickling can run arbitrary code. Convert it with safetensors.torch.save_file")
    raise DamagedRunError(f"{path} is not a whole safetensors file (truncated or another format); restore it "
                          "from a copy, or start the run again with --overwrite")


def read_checkpoint(path: Path, prefix: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a checkpoint; with `prefix` only the tensors under it, prefix removed.

    Any damage (a truncated file, an edited header, metadata that is not reslab's) is one DamagedRunError line.
    """
    return _read(path, prefix, with_tensors=True)


def _read(path: Path, prefix: str | None, with_tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    check_safetensors(path)
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            for name in handle.keys() if with_tensors else ():
                if prefix is None or name.startswith(prefix):
                    tensors[name[len(prefix):] if prefix else name] = handle.get_tensor(name)
        meta = json.loads(metadata.get("meta", "{}"))
    except Exception as error:  # noqa: BLE001 - safetensors' errors have no common type; all mean "damaged"
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise DamagedRunError(f"{path} is damaged ({first}); restore it from a copy, or start the run again "
                              "with --overwrite") from None
    if not isinstance(meta, dict):
        raise DamagedRunError(f"{path}: its metadata is not reslab's; restore it from a copy")
    return tensors, meta


def check_model_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path | str) -> None:
    """Every tensor the model needs is there, with its shape and dtype; the first mismatch is named."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise DamagedRunError(f"{path} does not match the model built from config.json ({what}); "
                              "was config.json edited or copied from another run?")
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise DamagedRunError(f"{path}: tensor {name!r} is {_describe(got)}, the model expects {_describe(want)}; "
                                  "config.json and the checkpoint disagree")
        if got.dtype.is_floating_point and not torch.isfinite(got).all():
            raise DamagedRunError(f"{path}: tensor {name!r} holds non-finite values; the checkpoint cannot be used "
                                  "(reslab never writes one): restore it from a copy")


def check_optimizer_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any], optimizer, path: Path) -> None:
    """Optimizer state for parameters that exist, each moment shaped like its parameter, a float dtype."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    _check_param_groups(meta.get("param_groups"), optimizer, path)
    _check_state_keys(tensors, optimizer, path)
    for name, tensor in tensors.items():
        parts = name.split(".", 2)
        index = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else -1
        if not 0 <= index < len(params):
            raise DamagedRunError(f"{path}: {name!r} names no parameter of this run's optimizer")
        wanted = () if parts[2] == "step" else tuple(params[index].shape)
        if tuple(tensor.shape) != wanted or not tensor.dtype.is_floating_point:
            raise DamagedRunError(f"{path}: {name!r} is {_describe(tensor)}, expected shape {list(wanted)} "
                                  "float; restore the checkpoint from a copy")


def _check_param_groups(groups: Any, optimizer, path: Path) -> None:
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if (not isinstance(groups, list) or len(groups) != len(sizes)
            or any(not isinstance(g, dict) or not isinstance(g.get("params"), list) for g in groups)
            or [len(g["params"]) for g in groups] != sizes):
        raise DamagedRunError(f"{path}: the optimizer metadata does not match this run's optimizer "
                              f"(parameter groups of {sizes} parameters); restore the checkpoint from a copy")


def _check_state_keys(tensors: dict[str, torch.Tensor], optimizer, path: Path) -> None:
    """Each parameter with optimizer state has all of it (the same keys as the others in its group), and a
    trained run has state at all."""
    keys: dict[int, set[str]] = {}
    for name in tensors:
        _, index, key = (name.split(".", 2) + ["", ""])[:3]
        if index.isdigit():
            keys.setdefault(int(index), set()).add(key)
    if not keys:
        raise DamagedRunError(f"{path} holds no optimizer state; restore the checkpoint from a copy")
    start = 0
    for group in optimizer.param_groups:
        found = [keys[i] for i in range(start, start + len(group["params"])) if i in keys]
        if found and any(k != found[0] for k in found):
            raise DamagedRunError(f"{path}: the optimizer state of a parameter is incomplete; restore the "
                                  "checkpoint from a copy")
        start += len(group["params"])


def check_rng_tensors(tensors: dict[str, torch.Tensor], current: dict[str, torch.Tensor], path: Path) -> None:
    """The RNG states a resume restores: the same names, sizes and dtype (uint8) as this process's own."""
    for name, like in current.items():
        got = tensors.get(f"rng.{name}")
        if got is None and name == "cuda":
            continue  # a CPU checkpoint resumed on CUDA: the CUDA generator starts from the seed
        if got is None or got.shape != like.shape or got.dtype != like.dtype:
            found = "missing" if got is None else _describe(got)
            raise DamagedRunError(f"{path}: RNG state {name!r} is {found}, expected {_describe(like)}; "
                                  "restore the checkpoint from a copy")
        if name != "cuda":
            try:  # a state of the right size can still be no valid Mersenne Twister state
                torch.Generator().set_state(got)
            except RuntimeError:
                raise DamagedRunError(f"{path}: RNG state {name!r} is not a valid generator state; restore the "
                                      "checkpoint from a copy") from None


def _describe(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"


def read_run_config(run_dir: Path) -> dict[str, Any]:
    return RunDir(run_dir).read_config()


def load_run_model(run_dir: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a run directory (weights from checkpoint.safetensors) and its config.json."""
    from reslab.memory import check_fits
    from reslab.models import build_model, check_saved_model_config

    config = read_run_config(run_dir)
    check_saved_model_config(config["model"], config["model_config"], Path(run_dir) / CONFIG)
    check_fits(config["model"], config["model_config"], device=torch.device(device))
    model = build_model(config["model"], **config["model_config"])
    path = Path(run_dir) / CHECKPOINT
    tensors, _ = read_checkpoint(path, prefix="model.")
    load_model_tensors(model, tensors, path)
    return model.to(device).eval(), config


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's metadata (training state, optimizer groups) without reading its tensors."""
    _, meta = _read(path, None, with_tensors=False)
    check_training_state(meta, path)
    return meta


def checkpoint_step(path: Path) -> int:
    """The number of steps the checkpoint at `path` has trained."""
    return read_checkpoint_meta(path)["state"]["step"]


def check_training_state(meta: Any, path: Path) -> None:
    """The scalar training state a resume continues from: a step count and finite bookkeeping numbers."""
    state = meta.get("state") if isinstance(meta, dict) else None
    if not isinstance(state, dict) or not isinstance(meta.get("optimizer"), dict):
        raise DamagedRunError(f"{path}: no reslab training state in its metadata; restore it from a copy")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise DamagedRunError(f"{path}: its training state has step {step!r}, not a count; restore it from a copy")
    for key in ("train_seconds", "tokens_seen", "window_loss_sum", "window_steps", "best_val_loss",
                "last_val_loss", "last_train_loss"):
        value = state.get(key, 0)
        if value is None and key.endswith("_loss"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DamagedRunError(f"{path}: its training state has {key} {value!r}; restore it from a copy")
