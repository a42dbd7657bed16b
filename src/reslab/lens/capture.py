"""One forward pass, watched at the residual sites: the stream as the model carries it, and every sublayer's write.

Two attachments, both at the sites and removed afterwards (models are never edited):
- forward hooks on the site modules see the stream exactly as the model passes it on: widened (hyper-connections'
  n streams, AttnRes' stack of sources, value residual's stream plus first values) where the scheme widens it;
- the site's probe slot (`site.probe`, fed by `observe(x, fx, out)`) receives each sublayer's write `fx`, the term a
  site adds to the stream in the additive schemes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from reslab.contracts import LensModel, is_attention, missing
from reslab.errors import ReslabError


def check_lens_model(model: nn.Module) -> None:
    """The lens decodes with the model's own stream adapter, final norm and head; say which one is missing."""
    member = missing(model, LensModel)
    if member is not None:
        raise ReslabError(f"{type(model).__name__} has no {member!r}; the lens needs a reslab language model "
                          "(reslab.contracts.LensModel: gpt, llama, tiny or one built like them)")


def site_names(model: nn.Module) -> list[str]:
    """'embed', then '<block>.attn' / '<block>.ffn' for every site in forward order."""
    names = ["embed"]
    for layer, block in enumerate(model.blocks):
        for index, (_, sublayer) in enumerate(block.sites()):
            role = "attn" if is_attention(sublayer) else ("ffn" if index else f"sub{index}")
            names.append(f"{layer}.{role}")
    return names


class StreamCapture:
    """Records, for one forward: `streams` (the stream entering the first site, then the stream leaving each site,
    as the model carries it) and `writes` (each sublayer's write `fx`, as its site reports it)."""

    def __init__(self, model: nn.Module):
        self.sites = [site for _, _, site in model.residual_sites()]
        if not self.sites:
            raise ReslabError(f"{type(model).__name__} has no residual sites; the lens reads the stream there")
        self.streams: list[Any] = []
        self.writes: list[torch.Tensor] = []

    def record(self, site, x: torch.Tensor, fx: torch.Tensor, out: torch.Tensor) -> None:
        """The probe interface of `ResidualSite.observe`."""
        self.writes.append(fx.detach())

    def _enter(self, site: nn.Module, args: tuple) -> None:
        if not self.streams:
            self.streams.append(args[0])

    def _leave(self, site: nn.Module, args: tuple, output: Any) -> None:
        self.streams.append(output)

    @contextmanager
    def attached(self):
        """Attach to every site for the `with` block; a probe already attached (training's) is put back after."""
        previous = [site.probe for site in self.sites]
        handles = [self.sites[0].register_forward_pre_hook(self._enter)]
        handles += [site.register_forward_hook(self._leave) for site in self.sites]
        for site in self.sites:
            site.probe = self
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for site, probe in zip(self.sites, previous):
                site.probe = probe


@torch.no_grad()
def capture_forward(model: nn.Module, tokens: torch.Tensor) -> tuple[StreamCapture, torch.Tensor]:
    """Run `model` on `tokens` in eval mode (no dropout) with a capture attached: (capture, output logits)."""
    check_lens_model(model)
    capture = StreamCapture(model)
    was_training = model.training
    model.eval()
    try:
        with capture.attached():
            output = model(tokens)
    finally:
        model.train(was_training)
    logits = output.logits if hasattr(output, "logits") else output
    if len(capture.streams) != len(capture.sites) + 1:
        raise ReslabError(f"{type(model).__name__} called its residual sites {len(capture.streams) - 1} times for "
                          f"{len(capture.sites)} sites; the lens needs each site called once per forward")
    return capture, logits


def decode(model: nn.Module, stream: Any) -> torch.Tensor:
    """Logits from a stream at any site: reduced by the model's stream adapter, its final norm, its head."""
    return model.head(model.norm(model.stream.reduce(stream)))


def as_batch(tokens: torch.Tensor | list, name: str = "tokens") -> torch.Tensor:
    """(batch, seq) int64 from a (seq,) or (batch, seq) tensor or list of ids."""
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ReslabError(f"{name} must be integer token ids of shape (seq,) or (batch, seq), got "
                          f"{tuple(tokens.shape)} {tokens.dtype}")
    return tokens.long()


def inputs_and_targets(tokens, targets) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(inputs, targets, evaluated positions): without targets, each position predicts the next token, so the
    last position is not evaluated."""
    tokens = as_batch(tokens)
    if targets is None:
        if tokens.shape[1] < 2:
            raise ReslabError("the lens needs at least 2 tokens (a position and the next token it predicts)")
        return tokens, tokens[:, 1:], tokens.shape[1] - 1
    targets = as_batch(targets, "targets")
    if targets.shape != tokens.shape:
        raise ReslabError(f"targets must have the shape of tokens {tuple(tokens.shape)}, got {tuple(targets.shape)}")
    return tokens, targets, tokens.shape[1]


CONTEXT_FIELDS = ("context", "max_position_embeddings", "n_positions", "n_ctx")  # how configs name the context


def model_context(model: nn.Module) -> int | None:
    """The most positions the model reads, from its config (reslab's `context`, Hugging Face's names); None if
    it does not say."""
    config = getattr(model, "config", None)
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def check_ids(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> None:
    """Ids the model can read and score, and no more positions than its context: one error line, not an
    IndexError from inside the embedding."""
    vocab, context = getattr(getattr(model, "config", None), "vocab_size", None), model_context(model)
    if tokens.device.type == "meta":
        raise ReslabError("the lens needs real token ids, not meta tensors; pass ids on the CPU or the model's device")
    for name, ids in (("tokens", tokens), ("targets", targets)):
        if ids.numel() and vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ReslabError(f"{name} hold ids outside the model's vocabulary [0, {vocab}); "
                              f"got {int(ids.min())}..{int(ids.max())}")
    if context is not None and tokens.shape[-1] > context:
        raise ReslabError(f"{tokens.shape[-1]} tokens are more than the model's context of {context}; "
                          "split them into windows")


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights are (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))
