"""A reslab model as a Hugging Face folder: what `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load as they are.

The config and weights come from the family adapter (`to_hf_config`, `to_hf_state_dict`), so a model or residual
scheme without a Hugging Face equivalent is refused in one line before anything is written. The transformers model
is then run beside the reslab one and must give the same logits (within `TOLERANCE`, fp32), else nothing is written.

The tokenizer (`tokenizer_files`):
- byte-level BPE: reslab's BPE is a `tokenizers` tokenizer already; its tokenizer.json is written as it is;
- char: a `tokenizers` WordLevel tokenizer with one token per character (a Split pre-tokenizer that isolates every
  character, the run's sorted characters as the vocabulary, a Fuse decoder that joins them back): the same ids as
  reslab's CharTokenizer, and, as there, a character outside the vocabulary is an error (no unknown token);
- token ids (data prepared elsewhere, no text): no tokenizer file; the folder holds the model alone.
tokenizer_config.json names the generic `PreTrainedTokenizerFast`, so AutoTokenizer reads tokenizer.json as it is
rather than a family's own tokenizer class with its own special tokens.

The folder is written into a temporary directory beside DIR and renamed into place, so DIR is never half-written. A
DIR that is not empty is replaced only with `overwrite`, and only when it holds nothing but files an export writes
(an earlier export): reslab never deletes what it did not write.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from reslab.errors import ReslabError
from reslab.interop.base import quiet_transformers
from reslab.interop.checkpoint import HF_CONFIG, HF_TOKENIZER, HF_TOKENIZER_CONFIG
from reslab.interop.convert import to_hf_config, to_hf_state_dict
from reslab.io import TEMP_SUFFIX, temp_prefix

TOLERANCE = 1e-4  # the largest |logit difference| accepted between the reslab model and its export (fp32)
CHECK_TOKENS = 16  # positions of the logit check
EXPORT_MARKER = ".reslab-export"  # written into every export: only a folder holding it is replaced by --overwrite
EXPORT_FILES = (HF_CONFIG, "generation_config.json", "model.safetensors.index.json", HF_TOKENIZER,
                HF_TOKENIZER_CONFIG, "special_tokens_map.json", EXPORT_MARKER)  # and *.safetensors
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


@dataclass(frozen=True)
class Exported:
    directory: Path
    model_type: str  # the Hugging Face family written
    tokenizer: str  # the tokenizer written, in words
    logit_difference: float  # max |logit difference| with the reslab model on CHECK_TOKENS positions


def export_hf(model: nn.Module, tokenizer: Any, directory: str | Path, overwrite: bool = False) -> Exported:
    """Write `model` (a reslab model with a Hugging Face equivalent) and its `tokenizer` (a reslab.data Tokenizer)
    as a Hugging Face folder `directory`, atomically; see the module's docstring."""
    directory = Path(directory)
    hf_config = to_hf_config(model)  # no Hugging Face equivalent: refused here, nothing written
    check_destination(directory, overwrite)
    files, described = tokenizer_files(tokenizer, model.config.context)
    with quiet_transformers() as transformers:
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
        hf_model.load_state_dict(to_hf_state_dict(model), strict=True)
        difference = logit_difference(model, hf_model.eval())
        if not difference <= TOLERANCE:
            raise ReslabError(f"the {hf_config.model_type} export's logits differ from the model's by {difference:.2g} "
                              f"(more than {TOLERANCE:g}): transformers computes something else for this config; "
                              "nothing was written")
        write_folder(directory, lambda staged: _save(hf_model, files, staged))
    return Exported(directory, hf_config.model_type, described, difference)


def logit_difference(model: nn.Module, hf_model: nn.Module) -> float:
    """The largest |logit difference| of the two models on one sequence of CHECK_TOKENS ids (fewer if the context
    is shorter), both in eval mode, on the reslab model's device."""
    length = min(CHECK_TOKENS, model.config.context)
    device = next(model.parameters()).device
    ids = torch.arange(length, device=device).remainder(model.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        ours = model(ids).logits.float().cpu()
        theirs = hf_model.to(device)(input_ids=ids).logits.float().cpu()
    return (ours - theirs).abs().max().item()


def tokenizer_files(tokenizer: Any, context: int) -> tuple[dict[str, bytes], str]:
    """The Hugging Face tokenizer files of a reslab tokenizer (none for token ids without text), and what they are."""
    kind = getattr(tokenizer, "kind", "")
    if kind == "bpe":
        body, described = tokenizer.to_json()["hf_tokenizer"], "byte-level BPE (tokenizer.json as reslab's)"
    elif kind == "char":
        body, described = json.loads(char_tokenizer("".join(tokenizer.to_json()["chars"])).to_str()), \
            "char (a WordLevel tokenizer.json, one token per character)"
    else:
        return {}, f"none (a {kind or type(tokenizer).__name__} tokenizer has no text to write)"
    settings = {"tokenizer_class": TOKENIZER_CLASS, "model_max_length": context, "clean_up_tokenization_spaces": False}
    return {HF_TOKENIZER: _json(body), HF_TOKENIZER_CONFIG: _json(settings)}, described


def char_tokenizer(chars: str):
    """A `tokenizers.Tokenizer` giving character `chars[i]` the id i, one token per character, as reslab's
    CharTokenizer does; decoding joins the characters back."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    hf = Tokenizer(models.WordLevel({char: i for i, char in enumerate(chars)}))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character its own piece
    hf.decoder = decoders.Fuse()
    return hf


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=1, ensure_ascii=False).encode("utf-8")


def _save(hf_model: nn.Module, files: dict[str, bytes], staged: Path) -> None:
    hf_model.save_pretrained(staged)
    for name, data in files.items():
        (staged / name).write_bytes(data)


def check_destination(directory: Path, overwrite: bool) -> None:
    """Raise, having written nothing, unless `directory` is absent, empty, or (with `overwrite`) an earlier export."""
    if directory.is_symlink():
        raise ReslabError(f"--hf {directory} is a symlink; give the directory itself")
    if directory.exists() and not directory.is_dir():
        raise ReslabError(f"--hf {directory} is a file, not a directory; choose another --hf DIR")
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    if not overwrite:
        raise ReslabError(f"--hf {directory} is not empty; pass --overwrite to replace an earlier export there, or "
                          "choose another --hf DIR")
    _check_earlier_export(directory, directory)


def _check_earlier_export(directory: Path, shown: Path) -> None:
    """Raise unless `directory` holds an export reslab wrote (its marker) and nothing an export does not write."""
    if not (directory / EXPORT_MARKER).is_file():
        raise ReslabError(f"--hf {shown} holds a folder reslab did not export (no {EXPORT_MARKER}); reslab never "
                          "replaces what it did not write: choose another --hf DIR")
    foreign = sorted(path.name for path in directory.iterdir() if not _exported(path))
    if foreign:
        raise ReslabError(f"--hf {shown} holds {foreign[0]}, which an export does not write; reslab never deletes "
                          "what it did not write: choose another --hf DIR")


def _exported(path: Path) -> bool:
    """Could an export have written this file?"""
    return path.is_file() and not path.is_symlink() and (path.name in EXPORT_FILES or path.suffix == ".safetensors")


def write_folder(directory: Path, write: Callable[[Path], None]) -> None:
    """`write(staged)` fills a new temporary directory beside `directory`, which then takes its place (replacing an
    earlier export `check_destination` allowed); on any failure the temporary directory is removed."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staged = _temporary_beside(directory)
    try:
        write(staged)
        (staged / EXPORT_MARKER).write_text("written by reslab export; --overwrite replaces only such a folder\n")
        if directory.is_dir() and any(directory.iterdir()):
            earlier = _temporary_beside(directory)
            os.replace(directory, earlier)
            try:
                _check_earlier_export(earlier, directory)  # again: a file may have come while the export ran
                os.replace(staged, directory)
            except BaseException:
                os.replace(earlier, directory)  # the earlier export back in place
                raise
            shutil.rmtree(earlier)
        else:
            os.replace(staged, directory)  # onto nothing, or onto an empty directory
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _temporary_beside(directory: Path) -> Path:
    """A new empty directory `.NAME.<random>.tmp` beside `directory` (created with the user's umask)."""
    path = directory.parent / f"{temp_prefix(directory.name)}{secrets.token_hex(6)}{TEMP_SUFFIX}"
    path.mkdir()
    return path
