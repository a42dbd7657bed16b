"""What `reslab lens` looks at: a trained run, a Hugging Face folder or a built-in model, and the tokens to read it on.

Tokens come from `--prompt`, from `--data` (a corpus name or a text file) or, for a run, from the start of its own
validation split (random ids for the others); they are cut into windows of at most the model's context, each
position scored on the next token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from reslab.errors import ReslabError

if TYPE_CHECKING:
    from reslab.graph.targets import Trained


@dataclass
class LensInput:
    model: nn.Module
    inputs: torch.Tensor  # (windows, positions)
    targets: torch.Tensor  # (windows, positions): the next token of each input
    target: str  # what model, in words
    text: str  # which tokens, in words
    train_tokens: torch.Tensor | None = None  # a run's training split (1-D), when asked for (the tuned lens)


def windows(ids: torch.Tensor, context: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `limit` (input, next token) pairs from a 1-D id sequence, as rows of at most `context` positions; a
    sequence longer than one window is cut into whole windows (the remainder is dropped)."""
    ids = ids[:limit + 1]
    if len(ids) < 2:
        raise ReslabError(f"the text gives {len(ids)} token(s); the lens needs at least 2 (a position and its next "
                          "token); give a longer --prompt or --data")
    pairs = len(ids) - 1
    if pairs <= context:
        return ids[:-1].unsqueeze(0), ids[1:].unsqueeze(0)
    rows = pairs // context
    return ids[:rows * context].view(rows, context), ids[1:rows * context + 1].view(rows, context)


def read_text(prompt: str | None, data: str | None) -> tuple[str | None, str]:
    """(text, description) from --prompt or --data; (None, '') when neither is given."""
    if prompt is not None and data is not None:
        raise ReslabError("--prompt and --data both give the text; choose one")
    if prompt is not None:
        return prompt, f"--prompt ({len(prompt)} characters)"
    if data is not None:
        from reslab.data import load_text

        return load_text(data)
    return None, ""


def run_input(run_dir: Path, prompt: str | None, data: str | None, limit: int, device: torch.device,
              with_train: bool = False) -> LensInput:
    """A trained run, read on the given text or on its validation split (its tokenizer, its context); with
    `with_train`, its training split too."""
    from reslab.graph.targets import Kind, TargetSpec, load_trained

    trained = load_trained(TargetSpec(Kind.RUN, str(run_dir), Path(run_dir)), device)
    return trained_input(trained, prompt, data, limit, 0, device, with_train)


def trained_input(trained: Trained, prompt: str | None, data: str | None, limit: int, seed: int,
                  device: torch.device, with_train: bool = False) -> LensInput:
    """A model with trained weights (`graph.targets.load_trained`), read on the given text, else on a run's
    validation split, else (a Hugging Face folder) on random token ids; with `with_train`, a run's training split
    too."""
    from reslab.data import encode_corpus, load_text, split_tokens

    model, tokenizer, config = trained.model, trained.tokenizer, trained.config
    text, description = read_text(prompt, data)
    train = val = None
    if config is not None and (text is None or with_train):
        corpus, source = load_text(config.get("train", {}).get("data"))
        train, val = split_tokens(encode_corpus(tokenizer, corpus))
    if text is not None:
        ids = encode_corpus(tokenizer, text)
    elif val is not None:
        ids, description = val, f"the run's validation split ({source})"
    else:
        ids, description = random_ids(model.config.vocab_size, limit, seed)
    x, y = windows(ids, model.config.context, limit)
    return LensInput(model, x.to(device), y.to(device), trained.describe(), description,
                     train if with_train else None)


# (positions x vocabulary) fp32 arrays the lens holds at once for an entry: its logits, their log-softmax and its
# exp, and the model's own final distribution
LENS_COPIES = 4


def check_fits(tokens: int, vocab: int, device: torch.device) -> None:
    """Refuse up front, in one line, a read whose logits alone would not fit in the memory free on `device`, instead
    of being killed by the kernel part-way (`--eval-tokens 100000000`)."""
    from reslab.memory import available_bytes

    need = LENS_COPIES * tokens * vocab * 4
    free = available_bytes(device)
    if free is not None and need > free:
        raise ReslabError(f"the lens over {tokens:,} tokens and a {vocab:,}-token vocabulary needs about "
                          f"{need / 2**30:,.1f} GiB for its logits, more than the {free / 2**30:,.1f} GiB free on "
                          f"{device}; lower --eval-tokens")


def random_ids(vocab: int, limit: int, seed: int) -> tuple[torch.Tensor, str]:
    check_fits(limit, vocab, torch.device("cpu"))  # before the ids themselves are allocated
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (limit + 1,), generator=generator), f"random token ids (seed {seed})"


def builtin_input(model: nn.Module, name: str, prompt: str | None, data: str | None, limit: int, seed: int,
                  device: torch.device) -> LensInput:
    """A built-in model with random weights, read on the given text (char ids) or on random token ids."""
    from reslab.data import CharTokenizer, encode_corpus

    vocab, context = model.config.vocab_size, model.config.context
    text, description = read_text(prompt, data)
    if text is None:
        ids, description = random_ids(vocab, limit, seed)
    else:
        tokenizer = CharTokenizer.train(text)
        if tokenizer.vocab_size > vocab:
            raise ReslabError(f"the text has {tokenizer.vocab_size} distinct characters but the model's vocabulary "
                              f"has {vocab}; give a shorter text or a trained run")
        ids = encode_corpus(tokenizer, text)
    x, y = windows(ids, context, limit)
    target = f"{name} ({model.config.residual}), random weights: an untrained model, nothing learned to read"
    return LensInput(model.to(device).eval(), x.to(device), y.to(device), target, description)
