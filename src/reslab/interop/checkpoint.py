"""Local Hugging Face checkpoints: a save_pretrained directory (config.json plus safetensors) to a reslab model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from reslab.errors import ReslabError
from reslab.interop.base import require_transformers
from reslab.interop.convert import build_loaded

HF_CONFIG = "config.json"
HF_TOKENIZER = "tokenizer.json"  # Hugging Face's file name, in the `tokenizers` format
HF_TOKENIZER_CONFIG = "tokenizer_config.json"


def load_hf_checkpoint(directory: str | Path) -> nn.Module:
    """A reslab model from a local HF checkpoint directory: config.json plus *.safetensors (sharded or not).

    Offline by design: nothing is fetched. Pickled weights (pytorch_model.bin) are refused since unpickling can
    run arbitrary code.
    """
    directory = Path(directory)
    if not (directory / HF_CONFIG).is_file():
        raise ReslabError(f"{directory} has no {HF_CONFIG}; give the directory written by save_pretrained")
    config, files = read_hf_config(directory), safetensors_files(directory)
    try:
        return build_loaded(config, dict(_read_tensors(files)))
    except ReslabError as error:  # a weight or field that does not fit: name the folder
        raise ReslabError(f"{directory}: {error}") from None


def read_hf_config(directory: Path) -> Any:
    """The directory's config.json parsed by transformers (which fills in each model type's defaults)."""
    transformers = require_transformers("reading a Hugging Face config")
    try:
        return transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as error:  # noqa: BLE001 (transformers validates fields with its own exception types)
        message = " ".join(str(error).split())[:300] or type(error).__name__
        raise ReslabError(f"cannot read {directory / HF_CONFIG}: {message}") from None


def folder_tokenizer(directory: Path, vocab_size: int):
    """A Hugging Face folder's tokenizer: its tokenizer.json (any `tokenizers` model), else, without one, the token
    ids written as numbers (`IdTokenizer`: a prompt is ids, a sample prints ids)."""
    from reslab.data.tokenizer import IdTokenizer, load_tokenizer_file

    path = Path(directory) / HF_TOKENIZER
    return load_tokenizer_file(path) if path.is_file() else IdTokenizer(vocab_size)


def _index_shards(index: Path) -> list[str]:
    """The shard file names a model.safetensors.index.json maps weights to; one line when it is not such an index."""
    from reslab.io import read_json_file

    data = read_json_file(index, "copy the complete checkpoint", what="shard index")
    weights = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, str) for v in weights.values()):
        raise ReslabError(f"{index}: not a shard index (a weight_map of names to files); copy the complete checkpoint")
    return sorted(set(weights.values()))


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint: those its shard index names, else model.safetensors, else *.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = _index_shards(index)
        files = [directory / shard for shard in shards]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise ReslabError(f"{index.name} names {absent[0]}, which does not exist; copy the complete checkpoint")
        return files
    single = directory / "model.safetensors"
    files = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickled:
        raise ReslabError(f"{directory} holds {pickled[0]} but reslab loads safetensors only (pickle can run code); "
                          "re-save it with save_pretrained(directory, safe_serialization=True)")
    raise ReslabError(f"{directory} has no *.safetensors weights")


def _read_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    for file in files:
        yield from load_file(str(file)).items()
