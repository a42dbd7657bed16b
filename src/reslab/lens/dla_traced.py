"""Direct logit attribution on any model: the final stream split into the embedding and every write that a residual
add put on it, each write's contribution to the logit of the correct token, read from the traced graph.

Where the stream entering the final norm is exactly

    x_L = e + sum_i w_i          e: the stream entering the first block, w_i: what the i-th residual add adds

and the final norm's per-position scale is frozen at its value on x_L (TransformerLens' `apply_ln_to_stack`; the
`--frozen-norm` machinery of `lens/traced.py`), everything after the last block (final norm, head) is an affine
map `T(x) = A x + T(0)`, so

    logit_y = sum_c (T(c)_y - T(0)_y) + T(0)_y          c in {e, w_1, ..., w_n}

`contributions[c]` is `T(c)_y - T(0)_y` and `bias` is `T(0)_y` (the norm's bias and the head's bias through the
head); they add up to the model's own logit (`sum_error`). T is the model's own code: each component is decoded
as `reslab lens --frozen-norm` decodes a stream, by re-running the model with the last block's output overwritten.

Which values are the writes is read from one traced pass (the audit's tracer and residual rules,
`reslab.graph`), walking back from the stream leaving the last block to the stream entering the first: each step
must be a residual add (`x + w`, `x += w`; the audit's skip `x` is the carried stream itself, through views only),
and its other operand is a write. The branch may be anything: a sublayer's output (Llama), that output normed
(Gemma 2's and OLMo-2's post-sublayer norms: the write is the normed value, still added), a scaled or gated output.
Parallel blocks (GPT-NeoX) add `attn + mlp` to one skip: an add in the block's own forward that builds the write
is split into its operands, one component each. The values are kept during that pass: every operand of an add is
cloned just before the add runs. Each write is named by the outermost module call that returned it (its op and
module otherwise).

Refused in one line (a `ReslabError`), naming the module: a norm, or any op other than such an add, on the
stream between the embedding and the final norm (post-LN: every norm rescales all earlier writes); a residual
whose skip is scaled, gated or mixed before the add (DeepNorm's `alpha x`, a highway gate, hyper-connections);
an add that scales an operand (`torch.add(..., alpha=)`, a subtraction); a connection across depth that adds an
earlier stream (an embedding re-injection, a long or dense skip, backout); ops after the head (Gemma 2's final
softcapping `tanh(z / c) * c` is not linear: set it off, `--set final_logit_softcapping=null`, and the DLA is that
of the logit before the cap, which is what the head computes either way).

Cost: one traced pass that keeps the add operands, then one forward per component and one for `T(0)`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from reslab.errors import ReslabError
from reslab.graph import ops
from reslab.graph.residuals import ACROSS_KINDS
from reslab.graph.trace import Recorder, Trace, TraceError, Tracer, describe_modules, named_tensors
from reslab.lens.decomposition import Decomposition
from reslab.lens.traced import TracedLens, TracedPlan, op_label, value_root

STILL = "the logit lens still applies"
# connections across depth that add an earlier stream (or a sum of them) to the carried one: refused; a value
# embedding (`x + table[token]`) adds a write like any other
ACROSS = frozenset(kind for kind in ACROSS_KINDS if kind != "value embedding")


# --- one traced pass that keeps the values added ---------------------------------------------------------------------


class _Keeping(Recorder):
    """Records every torch call into the tracer (the audit's `Recorder`) and clones each data operand of an add
    just before the add runs (an in-place `x += w` overwrites x), keyed by the operand's node id."""

    def __init__(self, tracer: Tracer):
        super().__init__(tracer)
        self.values: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kept = []
        if ops.op_name(func)[0] == "add":
            for value in args[:2]:
                node_id = self.tracer.ids.get(value) if isinstance(value, torch.Tensor) else None
                if node_id is not None and self.tracer.nodes[node_id].data:
                    kept.append((node_id, value.detach().clone()))
        out = super().__torch_function__(func, types, args, kwargs)
        self.values.update(kept)
        return out


def keep_trace(model: nn.Module, tokens: torch.Tensor) -> tuple[Trace, dict[int, torch.Tensor]]:
    """(the trace of `model(tokens)`, as `reslab.graph.trace_model` records it; each add operand's value)."""
    tracer = Tracer(model)
    tracer.leaf(tokens, "input", "input")
    handles = []
    keeping = _Keeping(tracer)
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(tracer.enter, with_kwargs=True))
            handles.append(module.register_forward_hook(tracer.leave, with_kwargs=True, always_call=True))
        with torch.no_grad(), keeping:
            output = model(tokens)
    except Exception as error:
        failed = str(TraceError(tracer.failed_path or "", error)).splitlines()[0]
        raise ReslabError(f"tracing {type(model).__name__} for the direct logit attribution failed: {failed}") from None
    finally:
        for handle in handles:
            handle.remove()
    outputs = [(name or "output", tracer.node_of(t)) for name, t in named_tensors(output, "")]
    device = next((str(p.device) for p in model.parameters()), "cpu")
    trace = Trace(type(model).__name__, tracer.nodes, tracer.calls, outputs, describe_modules(model), device,
                  tracer.control)
    return trace, keeping.values


# --- the writes, from the graph --------------------------------------------------------------------------------------


def find_writes(trace: Trace, residuals: list, plan: TracedPlan) -> list[tuple[str, int, str]]:
    """(name, operand node id, block) of every write on the stream, in forward order: the walk of the module doc
    from the stream leaving the last block back to the stream entering the first; a ReslabError where it is no
    sum. The block is the one whose forward ran the add: the lens entry after which the write is in the stream."""
    by_add = {r.add: r for r in residuals}
    embed, node_id, found = value_root(trace, plan.first_in), value_root(trace, plan.last_out), []
    while node_id != embed:
        node = trace.nodes[node_id]
        residual = by_add.get(node_id)
        if node_id < embed or residual is None or node.op != "add":
            raise ReslabError(_not_an_add(trace, node, plan))
        if residual.kind in ACROSS:
            raise ReslabError(f"the {residual.kind} from {residual.skip_from} in {residual.owner or '(model)'} adds an "
                              "earlier stream to the carried one: the attribution follows one stream from block to "
                              f"block, so this connection across depth has none; {STILL}")
        carried = value_root(trace, residual.skip)
        skip = next((o for o in node.operands[:2] if o >= 0 and value_root(trace, o) == carried), None)
        if skip is None:
            where = ", ".join(op_label(trace, trace.nodes[o]) for o in node.operands[:2] if o >= 0)
            raise ReslabError(f"the residual in {residual.owner or '(model)'} ({residual.kind}) adds the stream "
                              f"after scaling, gating or mixing it ({where}): earlier writes do not reach the final "
                              f"norm unchanged, so the final stream has no direct logit attribution; {STILL}")
        if node.scaled:
            raise ReslabError(f"{op_label(trace, node)} scales what it adds (alpha, or a subtraction): the final "
                              "stream is not embedding + a sum of writes, so it has no direct logit attribution; "
                              f"{STILL}")
        branch = next((o for o in node.operands[:2] if o != skip), -1)
        if branch < 0 or not trace.nodes[branch].data:
            raise ReslabError(f"{op_label(trace, node)} adds a constant to the stream, not a write computed from the "
                              f"input; its direct logit attribution is not defined; {STILL}")
        parts, block = sorted(_split(trace, branch, node.call)), _block(trace, node.call, plan.blocks)
        found[:0] = [(_producer(trace, part, node.call), part, block) for part in parts]
        node_id = carried
    return _unique(found)


def _not_an_add(trace: Trace, node, plan: TracedPlan) -> str:
    """The one line for a stream value that no residual add made (see `find_writes`)."""
    where = op_label(trace, node)
    if trace.in_norm(node):
        return (f"the stream is normalised by {where} on its way from {plan.blocks[0]} to the final norm (post-LN, "
                "or a norm between blocks): that rescales every earlier write, so the final stream is not embedding "
                f"+ a sum of writes and has no direct logit attribution; {STILL}")
    return (f"the stream reaching the final norm is made by {where}, which is not a residual add of a write to the "
            f"stream: the final stream is not embedding + a sum of writes, so it has no direct logit attribution; "
            f"{STILL}")


def _split(trace: Trace, node_id: int, call: int) -> list[int]:
    """A write that an add in the residual's own forward builds from two computed values (GPT-NeoX's parallel
    `attn + mlp`) is those values, each split again; any other write is itself."""
    node = trace.nodes[node_id]
    data = [o for o in node.operands[:2] if o >= 0 and trace.nodes[o].data]
    if node.op != "add" or node.scaled or node.call != call or len(data) != 2 or len(node.operands) != 2:
        return [node_id]
    return [part for operand in data for part in _split(trace, operand, call)]


def _producer(trace: Trace, node_id: int, call: int) -> str:
    """The outermost module call inside `call` (the residual add's forward) that returned the write, by its path;
    the op and its module when no call returned it."""
    root = value_root(trace, node_id)
    returned = [c for c in trace.calls if c.id != call and trace.within(c.id, call)
                and any(value_root(trace, o) == root for o in c.outputs)]
    if returned:
        return min(returned, key=lambda c: c.depth).path
    return op_label(trace, trace.nodes[root])


def _block(trace: Trace, call: int, blocks: list[str]) -> str:
    """The block whose call holds `call` (the lens stream is read between blocks, so every add is in one)."""
    paths = [trace.calls[c].path for c in trace.chain(call)]
    return next((path for path in paths if path in blocks), blocks[-1])


def _unique(found: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    """Names made unique: a module that writes twice gets `#2`, `#3` on its later writes."""
    seen: dict[str, int] = {}
    named = []
    for name, node_id, block in found:
        seen[name] = seen.get(name, 0) + 1
        named.append((name if seen[name] == 1 else f"{name}#{seen[name]}", node_id, block))
    return named


# --- the attribution -------------------------------------------------------------------------------------------------


def _as_stream(value: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    """A kept operand in the stream's shape (a view of it reshaped, a broadcast one expanded)."""
    if value.numel() == shape.numel():
        return value.reshape(shape)
    try:
        return torch.broadcast_to(value, shape)
    except RuntimeError:
        raise ReslabError(f"the write {name} {tuple(value.shape)} is not shaped like the stream {tuple(shape)}; "
                          "it cannot be decoded as part of it") from None


@torch.no_grad()
def traced_decomposition(lens: TracedLens, tokens: torch.Tensor, targets: torch.Tensor, positions: int,
                         streams: list[torch.Tensor], logits: torch.Tensor) -> Decomposition:
    """The decomposition of a traced model's final stream (see the module doc), after `lens.capture(tokens)` gave
    `streams` and `logits` (and recorded the final norm's scales); targets (batch, positions)."""
    from reslab.graph.audit import audit_trace
    from reslab.lens.traced import plan_from_audit

    plan = lens.plan
    if plan.after_head:
        raise ReslabError(f"the logits are computed from the head's output by {', '.join(plan.after_head)} "
                          "(softcapping is not linear), so the writes' contributions do not add up to them; set it off "
                          f"for the attribution (Gemma 2: --set final_logit_softcapping=null); {STILL}")
    trace, values = keep_trace(lens.model, tokens)
    found = audit_trace(trace, trace.model_cls)
    walked = plan_from_audit(found)
    if walked.blocks != plan.blocks:
        raise ReslabError(f"{plan.model} ran other blocks on the whole batch ({', '.join(walked.blocks)}) than on one "
                          "sequence; the attribution needs the same blocks")
    writes = find_writes(trace, found.residuals, walked)
    final = streams[-1]
    components = [streams[0].float()] + [_as_stream(values[node_id], final.shape, name).float()
                                         for name, node_id, _ in writes]
    frozen = bool(lens.recorded)  # no scale op after the last block: no norm, the tail is affine as it is

    def target(out: torch.Tensor) -> torch.Tensor:
        return out[:, :positions].float().gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    bias = target(lens.decode(tokens, torch.zeros_like(final), frozen))
    contributions = torch.stack([target(lens.decode(tokens, c.to(final.dtype), frozen)) - bias for c in components])
    stream_error = (torch.stack(components).sum(0) - final.float()).abs().max().item()
    norm = ", ".join(plan.norm) if plan.norm else "none"
    return Decomposition(["embed", *[name for name, _, _ in writes]], torch.stack(components).cpu(),
                         contributions.cpu(), bias.cpu(), target(logits).cpu(), stream_error, norm,
                         entries=["embed", *[block for _, _, block in writes]])


def decomposition_or_refusal(lens: TracedLens, tokens: torch.Tensor, targets: torch.Tensor, positions: int,
                             streams: list[torch.Tensor], logits: torch.Tensor) -> tuple[Decomposition | None,
                                                                                          str | None]:
    """(the decomposition, None), or (None, the one-line reason it is refused): for `LensResult`."""
    try:
        return traced_decomposition(lens, tokens, targets, positions, streams, logits), None
    except ReslabError as error:
        return None, str(error)


@torch.no_grad()
def decompose_traced(model: nn.Module, tokens: Any, targets: Any = None) -> Decomposition:
    """The decomposition of any model's final stream on `tokens` ((seq,) or (batch, seq) ids), read from its traced
    graph; a ReslabError (one line) where the final stream is not a sum of writes."""
    from reslab.lens.capture import inputs_and_targets
    from reslab.lens.capture import check_ids, model_device

    tokens, targets, positions = inputs_and_targets(tokens, targets)
    check_ids(model, tokens, targets)
    tokens, targets = tokens.to(model_device(model)), targets.to(model_device(model))
    was_training = model.training
    model.eval()
    try:
        lens = TracedLens(model, tokens)
        streams, logits = lens.capture(tokens)
        return traced_decomposition(lens, tokens, targets, positions, streams, logits)
    finally:
        model.train(was_training)


__all__ = ["decompose_traced", "decomposition_or_refusal", "find_writes", "keep_trace", "traced_decomposition"]
