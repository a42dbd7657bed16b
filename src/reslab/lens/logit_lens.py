"""The logit lens (nostalgebraist 2020): decode the stream after the embedding and after every sublayer with the
model's own final norm and head, and measure each decoded distribution against the next token and against the
model's output.

For every entry l (the embedding, then each sublayer's site, in forward order) and evaluated position t:

    logits_l = head(norm(reduce(stream_l)))          reduce: the model's stream adapter (identity for one stream)
    loss     = -log p_l(next token)
    entropy  = -sum_v p_l(v) log p_l(v)
    top-1    = [argmax p_l == argmax p_final]
    KL       = sum_v p_final(v) (log p_final(v) - log p_l(v))    KL(final || lens), as the tuned-lens paper

The last entry is the model's output itself (its KL is 0 and its top-1 agreement 1).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.errors import ReslabError
from reslab.lens.capture import capture_forward, decode, inputs_and_targets, site_names
from reslab.lens.decompose import decomposition_from, refusal
from reslab.lens.result import METRICS, LensResult
from reslab.lens.streams import per_stream
from reslab.residual.base import StreamAdapter

__all__ = ["METRICS", "LensResult", "lens", "lens_metrics"]


def lens_metrics(logits: torch.Tensor, final_logp: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four per-position metrics of one decoded entry (all (batch, positions))."""
    logp = F.log_softmax(logits.float(), dim=-1)
    final_p = final_logp.exp()
    return {
        "loss": -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
        "entropy": -(logp.exp() * logp).sum(-1),
        "agreement": (logp.argmax(-1) == final_logp.argmax(-1)).float(),
        "kl": (final_p * (final_logp - logp)).sum(-1),
    }


def describe_stream(model: nn.Module) -> str:
    """How the lens read the stream, in words: plain, or reduced by the scheme's stream adapter."""
    no_norm = isinstance(model.norm, nn.Identity)
    norm = "the head (the scheme has no final norm)" if no_norm else "the final norm and head"
    adapter = type(model.stream)
    if adapter is StreamAdapter:
        return f"the residual stream at each site's output, decoded by {norm}"
    summary = f": {adapter.__doc__.strip().splitlines()[0]}" if adapter.__doc__ else ""
    return (f"the stream at each site's output as the scheme carries it, reduced to one by the model's stream "
            f"adapter (model.stream.reduce, {adapter.__name__}{summary}), then decoded by {norm}")


def check_ids(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> None:
    """Ids the model can read and score, and no more positions than its context: one error line, not an
    IndexError from inside the embedding."""
    config = getattr(model, "config", None)
    vocab, context = getattr(config, "vocab_size", None), getattr(config, "context", None)
    if tokens.device.type == "meta":
        raise ReslabError("the lens needs real token ids, not meta tensors; pass ids on the CPU or the model's device")
    for name, ids in (("tokens", tokens), ("targets", targets)):
        if ids.numel() and vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ReslabError(f"{name} hold ids outside the model's vocabulary [0, {vocab}); "
                              f"got {int(ids.min())}..{int(ids.max())}")
    if context is not None and tokens.shape[-1] > context:
        raise ReslabError(f"{tokens.shape[-1]} tokens are more than the model's context of {context}; "
                          "split them into windows")


@torch.no_grad()
def lens(model: nn.Module, tokens, targets=None, *, keep_logits: bool = False, tuned: nn.Module | None = None
         ) -> LensResult:
    """The logit lens of `model` on `tokens` ((seq,) or (batch, seq) ids), see the module docstring.

    Without `targets` each position is scored on the next token. Additive schemes also get the decomposition of the
    final stream (`result.decomposition`); the others a one-line reason (`result.refused`). With a `tuned` lens
    (`reslab.lens.tuned.fit_tuned_lens`) its metrics are reported beside the logit lens's (`result.tuned`)."""
    tokens, targets, positions = inputs_and_targets(tokens, targets)
    check_ids(model, tokens, targets)
    tokens, targets = tokens.to(next(model.parameters()).device), targets.to(next(model.parameters()).device)
    capture, output = capture_forward(model, tokens)
    final_logp = F.log_softmax(output[:, :positions].float(), dim=-1)
    per_entry, per_entry_tuned, kept = [], [], []
    for entry, stream in enumerate(capture.streams):
        logits = decode(model, stream)[:, :positions]
        per_entry.append(lens_metrics(logits, final_logp, targets))
        if tuned is not None:
            translated = model.head(model.norm(tuned(entry, model.stream.reduce(stream))))[:, :positions]
            per_entry_tuned.append(lens_metrics(translated, final_logp, targets))
        if keep_logits:
            kept.append(logits.float())
    per_position = {m: torch.stack([entry[m] for entry in per_entry]).cpu() for m in METRICS}
    means = {m: per_position[m].flatten(1).mean(1).tolist() for m in METRICS}
    tuned_means = {m: [e[m].mean().item() for e in per_entry_tuned] for m in METRICS} if tuned is not None else None
    reason = refusal(model)
    decomposition = None if reason else decomposition_from(model, capture, output, targets, positions)
    return LensResult(site_names(model), means["loss"], means["entropy"], means["agreement"], means["kl"],
                      per_position=per_position, scheme=type(capture.sites[0]).name,
                      stream=describe_stream(model), tokens=targets.numel(), decomposition=decomposition,
                      refused=reason, logits=torch.stack(kept) if keep_logits else None, tuned=tuned_means,
                      streams=per_stream(model, capture, final_logp, targets, positions, lens_metrics))
