"""The logit lens (nostalgebraist 2020): decode the stream after the embedding and after every sublayer with the
model's own final norm and head, and measure each decoded distribution against the next token and against the
model's output.

For every entry l (the embedding, then each sublayer's site, in forward order) and evaluated position t:

    logits_l = head(norm(reduce(stream_l)))          reduce: the model's stream adapter (identity for one stream)
    loss     = -log p_l(next token)
    entropy  = -sum_v p_l(v) log p_l(v)
    top-1    = [argmax p_l == argmax p_final]
    KL       = sum_v p_final(v) (log p_final(v) - log p_l(v))    KL(final || lens), as the tuned-lens paper

The last entry is the model's output itself (its KL is 0 and its top-1 agreement 1). `frozen_norm=True` normalises
every entry with the final norm's scale on the model's own last stream instead of its own (TransformerLens' cached
scale; for additive schemes the running sum of the decomposition's direct logit attributions).

A module that is not a reslab language model (no `stream`, `norm`, `head`: a Hugging Face model, anything a
callable builds) is read where its traced graph says: the stream entering the first block and leaving each block,
decoded by everything after the last block (`lens/traced.py`); its entries are named by the blocks' paths.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.contracts import LensModel, missing
from reslab.errors import ReslabError
from reslab.lens.capture import (
    check_ids,
    capture_forward,
    decode,
    inputs_and_targets,
    model_device,
    site_names,
)
from reslab.lens.decompose import decomposition_from, refusal
from reslab.lens.result import FROZEN, METRICS, RECOMPUTED, LensResult
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
    summary = f": {first_sentence(adapter.__doc__)}" if adapter.__doc__ else ""
    return (f"the stream at each site's output as the scheme carries it, reduced to one by the model's stream "
            f"adapter (model.stream.reduce, {adapter.__name__}{summary}), then decoded by {norm}")


def first_sentence(doc: str, limit: int = 200) -> str:
    """A docstring's first sentence on one line, cut at a word under `limit` characters."""
    text = " ".join(doc.split())
    sentence = text.split(". ", 1)[0].rstrip(".") + "."
    return sentence if len(sentence) <= limit else sentence[:limit].rsplit(" ", 1)[0] + " ..."


def summarise(per_entry: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """(per_position[metric]: (entries, batch, positions), means[metric]: one per entry) from each entry's metrics."""
    per_position = {m: torch.stack([entry[m] for entry in per_entry]).cpu() for m in METRICS}
    return per_position, {m: per_position[m].flatten(1).mean(1).tolist() for m in METRICS}


def site_modules(model: nn.Module, capture) -> dict:
    """The modules a reslab model's lens used, for the JSON: its final norm, its head, each entry's site."""
    paths = {id(module): path for path, module in model.named_modules()}
    sites = [paths.get(id(site), "?") for site in capture.sites]
    streams = {"embed": f"{sites[0]}:in", **{name: f"{site}:out" for name, site in zip(site_names(model)[1:], sites)}}
    return {"final_norm": [] if isinstance(model.norm, nn.Identity) else ["norm"], "head": "head",
            "streams": streams}


@torch.no_grad()
def lens(model: nn.Module, tokens, targets=None, *, keep_logits: bool = False, tuned: nn.Module | None = None,
         frozen_norm: bool = False) -> LensResult:
    """The logit lens of `model` on `tokens` ((seq,) or (batch, seq) ids), see the module docstring.

    Without `targets` each position is scored on the next token. Additive schemes also get the decomposition of the
    final stream (`result.decomposition`); the others a one-line reason (`result.refused`). With a `tuned` lens
    (`reslab.lens.tuned.fit_tuned_lens`) its metrics are reported beside the logit lens's (`result.tuned`). With
    `frozen_norm` every entry is normalised with the final norm's scale on the model's own last stream instead of
    its own. A module that is not a reslab language model is read where its traced graph says (`lens/traced.py`)."""
    tokens, targets, positions = inputs_and_targets(tokens, targets)
    check_ids(model, tokens, targets)
    tokens, targets = tokens.to(model_device(model)), targets.to(model_device(model))
    if missing(model, LensModel) is not None:
        if tuned is not None:
            raise ReslabError(f"a tuned lens needs a reslab language model; {type(model).__name__} is read traced")
        return traced_lens(model, tokens, targets, positions, keep_logits=keep_logits, frozen_norm=frozen_norm)
    capture, output = capture_forward(model, tokens)
    final_logp = F.log_softmax(output[:, :positions].float(), dim=-1)
    decode_entry = entry_decoder(model, capture, frozen_norm)
    per_entry, per_entry_tuned, kept = [], [], []
    for entry, stream in enumerate(capture.streams):
        logits = decode_entry(stream)[:, :positions]
        per_entry.append(lens_metrics(logits, final_logp, targets))
        if tuned is not None:
            translated = model.head(model.norm(tuned(entry, model.stream.reduce(stream))))[:, :positions]
            per_entry_tuned.append(lens_metrics(translated, final_logp, targets))
        if keep_logits:
            kept.append(logits.float())
    per_position, means = summarise(per_entry)
    tuned_means = {m: [e[m].mean().item() for e in per_entry_tuned] for m in METRICS} if tuned is not None else None
    reason = refusal(model)
    decomposition = None if reason else decomposition_from(model, capture, output, targets, positions)
    return LensResult(site_names(model), means["loss"], means["entropy"], means["agreement"], means["kl"],
                      per_position=per_position, scheme=type(capture.sites[0]).name,
                      stream=describe_stream(model), tokens=targets.numel(), decomposition=decomposition,
                      refused=reason, logits=torch.stack(kept) if keep_logits else None, tuned=tuned_means,
                      streams=per_stream(model, capture, final_logp, targets, positions, lens_metrics),
                      norm=FROZEN if frozen_norm else RECOMPUTED, modules=site_modules(model, capture))


def entry_decoder(model: nn.Module, capture, frozen_norm: bool):
    """stream -> logits for a reslab model: its stream adapter, final norm and head (`capture.decode`); with
    `frozen_norm`, the norm's scale frozen at its value on the model's own last stream."""
    if not frozen_norm:
        return lambda stream: decode(model, stream)
    from reslab.lens.traced import frozen_decoder

    norm = frozen_decoder(model.norm, model.stream.reduce(capture.streams[-1]))
    return lambda stream: model.head(norm(model.stream.reduce(stream)))


def hidden_size(model: nn.Module) -> int | None:
    """A `transformers` model's width (its text config's hidden_size), which tells a stream of n concatenated
    streams from one; None for a model without such a config."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "hidden_size", None)
    return size if isinstance(size, int) else None


def traced_lens(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, positions: int, *,
                keep_logits: bool, frozen_norm: bool) -> LensResult:
    """The lens of any other module: blocks, stream, final norm and head found from its traced graph, each entry
    decoded by everything that follows the last block (`reslab.lens.traced`)."""
    from reslab.lens.dla_traced import decomposition_or_refusal
    from reslab.lens.streams import traced_per_stream
    from reslab.lens.traced import TracedLens

    was_training = model.training
    model.eval()
    try:
        traced = TracedLens(model, tokens)
        streams, output = traced.capture(tokens)
        final_logp = F.log_softmax(output[:, :positions].float(), dim=-1)
        per_entry, kept = [], []
        for stream in streams:
            logits = traced.decode(tokens, stream, frozen_norm)[:, :positions]
            per_entry.append(lens_metrics(logits, final_logp, targets))
            if keep_logits:
                kept.append(logits.float())
        decomposition, refused = decomposition_or_refusal(traced, tokens, targets, positions, streams, output)
        stream_lens = traced_per_stream(lambda stream: traced.decode(tokens, stream, frozen_norm), streams,
                                        hidden_size(model), final_logp, targets, positions, lens_metrics)
    except ReslabError as error:  # say why the graph was read at all: the model is not a reslab one
        raise ReslabError(f"{type(model).__name__} has no 'stream' (not a reslab language model), so the lens read "
                          f"its traced graph: {error}") from None
    finally:
        model.train(was_training)
    per_position, means = summarise(per_entry)
    plan = traced.plan
    return LensResult(plan.names, means["loss"], means["entropy"], means["agreement"], means["kl"],
                      per_position=per_position, scheme=f"{plan.model} (traced)", stream=plan.describe(),
                      tokens=targets.numel(), decomposition=decomposition, refused=refused, streams=stream_lens,
                      logits=torch.stack(kept) if keep_logits else None,
                      norm=FROZEN if frozen_norm else RECOMPUTED, modules=plan.modules())
