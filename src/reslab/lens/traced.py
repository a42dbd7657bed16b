"""The logit lens of any PyTorch language model: where to read the stream, its final norm and its head, found from
the traced computation (the audit's tracer and block finder, `reslab.graph`), never from module names.

From one traced forward pass:
- the blocks: the module list whose elements run one after another, each reading what the one before wrote
  (`reslab.graph.audit`); of several lists, the one that runs last (a decoder's);
- the stream: the input of the first block that its output is computed from (the skip of its residuals, where it
  has any), then each block's output that the next block reads as its stream. A block that reads anything else
  breaks the chain: there is no stream between the two to decode, and the lens refuses, naming the block;
- the head: walking back from the logits (the first output the last block's stream reaches) through ops with one
  computed input (softcapping's `tanh(x / c) * c`, a slice), the learned linear map (linear, matmul, einsum) they
  come from; none, and the lens refuses;
- the final norm: the ops between the last block's output and the head, named by the modules that ran them.

Each entry (the stream entering the first block, then each block's output) is decoded by running the model again
with the last block's output overwritten by that entry's stream (`Tensor.copy_` in a forward hook): whatever the
model does after its last block (the final norm recomputed on that stream, the head, softcapping) it does to the
entry as to its own stream. That is the standard logit lens (nostalgebraist 2020; TransformerLens'
`accumulated_resid(apply_ln=True)`), and the last entry is the model's output itself. The tail must work position
by position: the lens overwrites the stream at the first position and refuses when any other position's logits
move (a norm over the sequence, a head that pools).

`frozen=True` (`reslab lens --frozen-norm`): the final norm's per-position scale is not recomputed but taken from
the model's own last stream, as TransformerLens' `apply_ln_to_stack` does with its cached scale, which makes the
norm linear in the stream: the scale ops of the norm (rsqrt, sqrt, a vector norm) return the values they returned
on the model's own pass, and a fused `layer_norm` / `rms_norm` divides by the last stream's statistic.

Cost: the trace (on the first 16 positions), one pass that captures the streams, one that checks the tail is per
position, one that checks the replay, then per entry only what follows the last block (the blocks replay their
captured outputs; where the replay does not reproduce the model's logits exactly, each entry runs the whole model).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from reslab.errors import ReslabError
from reslab.graph import ops
from reslab.graph.audit import depends
from reslab.graph.trace import Trace, call_tensors, named_tensors

SCALE_OPS = frozenset({"rsqrt", "sqrt", "norm", "vector_norm", "layer_norm", "rms_norm"})  # a norm's scale
TRACE_POSITIONS = 16  # the plan is read from a trace on this many positions: its structure, not its numbers
HEAD_OPS = frozenset({"linear", "matmul", "rmatmul", "mm", "bmm", "addmm", "einsum"})  # an unembedding's op


@dataclass
class TracedPlan:
    """What the graph says: the blocks, where the stream is among each block's tensors, the head, the norm."""

    model: str  # the model's class name
    blocks: list[str]  # block module paths, in forward order
    stream_input: int  # the first block's stream: its index among the tensors of the block's arguments
    stream_outputs: list[int]  # each block's stream: its index among the tensors the block returns
    output: str  # the logits: their name among the tensors the model returns
    head: str  # the head's module and weight
    norm: list[str]  # what runs between the last block's output and the head (modules, or ops in a forward)
    after_head: list[str]  # the ops between the head and the logits (softcapping), in forward order
    carried: list[str]  # per block, the residual kinds it carries the stream with
    scales: frozenset[int]  # which scale ops (SCALE_OPS) after the last block are the final norm's
    first_in: int = -1  # the trace's node of the stream entering the first block (in the trace the plan read)
    last_out: int = -1  # ... and of the stream leaving the last block

    @property
    def names(self) -> list[str]:
        """The lens's entries: 'embed', then each block's path."""
        return ["embed", *self.blocks]

    def modules(self) -> dict[str, Any]:
        """The modules the lens used, for the JSON."""
        streams = {"embed": f"{self.blocks[0]}:in"}
        streams.update({block: f"{block}:out ({kinds})" for block, kinds in zip(self.blocks, self.carried)})
        return {"final_norm": self.norm, "head": self.head, "after_head": self.after_head, "output": self.output,
                "streams": streams}

    def describe(self) -> str:
        """How the stream was read and decoded, in words."""
        norm = f"the final norm ({', '.join(self.norm)})" if self.norm else "no final norm"
        after = f", then {', '.join(self.after_head)}" if self.after_head else ""
        return (f"traced: the stream entering {self.blocks[0]} and leaving each block, decoded by re-running "
                f"what follows {self.blocks[-1]} on it: {norm}, the head {self.head}{after}")


# --- the plan, from the traced graph ---------------------------------------------------------------------------------


def trace_plan(model: nn.Module, tokens: torch.Tensor) -> TracedPlan:
    """Trace `model` on `tokens` once and find its blocks, stream, head and final norm (see the module doc)."""
    from reslab.graph import audit
    from reslab.graph.trace import TraceError

    try:
        found = audit(model, (tokens,))
    except TraceError as error:
        raise ReslabError(f"tracing {type(model).__name__} for the lens failed: {error}") from None
    return plan_from_audit(found)


def plan_from_audit(found) -> TracedPlan:
    """The plan (blocks, stream, head, final norm) an audit's trace (`reslab.graph.Audit`) says, as `trace_plan`;
    its `first_in` and `last_out` are node ids of that trace (the direct logit attribution walks it)."""
    from reslab.graph.depth import chains

    trace = found.trace
    lists = chains(trace, [block.path for block in found.blocks])
    if not lists:
        raise ReslabError(f"{trace.model_cls} has no blocks the stream runs through (a module list whose "
                          "elements each run once, each reading the one before); the lens reads the stream there")
    chain = max(lists, key=lambda c: c.calls[-1])
    skips = {value_root(trace, r.skip) for r in found.residuals}
    stream_input, outputs = _streams(trace, list(chain.paths), list(chain.calls), skips)
    last_call = trace.calls[chain.calls[-1]]
    last = last_call.outputs[outputs[-1]]
    output, logits = _logits(trace, last, chain.paths[-1])
    head, after, head_input = _head(trace, logits, last, chain.paths[-1])
    between = _between(trace, last, head_input)
    tail = [n.id for n in trace.nodes[last_call.end:] if n.op in SCALE_OPS]
    kinds = {block.path: [found.residuals[i].kind for i in block.residuals] for block in found.blocks}
    return TracedPlan(trace.model_cls, list(chain.paths), stream_input, outputs, output,
                      _head_name(trace, head), _names(trace, between, last_call.id, head.call),
                      [op_label(trace, trace.nodes[i]) for i in after],
                      [", ".join(kinds.get(p) or ["no residual"]) for p in chain.paths],
                      frozenset(j for j, node_id in enumerate(tail) if node_id in between),
                      trace.calls[chain.calls[0]].inputs[stream_input], last)


def value_root(trace: Trace, node_id: int) -> int:
    """The value a node is a view of (a reshape, a cast): views of one value are that value."""
    nodes = trace.nodes
    while node_id >= 0 and nodes[node_id].role == "view" and nodes[node_id].through >= 0:
        through = nodes[node_id].through
        if _numel(nodes[through].shape) != _numel(nodes[node_id].shape):
            break  # a slice keeps only part of the value
        node_id = through
    return node_id


def _numel(shape: tuple[int, ...] | None) -> int | None:
    return None if shape is None else int(torch.Size(shape).numel())


def _streams(trace: Trace, paths: list[str], calls: list[int], skips: set[int]) -> tuple[int, list[int]]:
    """(the first block's stream among its inputs, each block's stream among its outputs): an input of the block
    (the previous block's output, else a residual's skip, else any computed input) that an output of the same
    shape is computed from."""
    nodes, previous, first, outputs = trace.nodes, None, -1, []
    for path, call_id in zip(paths, calls):
        call = trace.calls[call_id]
        inputs = [i for i, node_id in enumerate(call.inputs) if nodes[node_id].data]
        if previous is not None:
            inputs = [i for i in inputs if value_root(trace, call.inputs[i]) == previous]
            if not inputs:
                raise ReslabError(f"{path} does not read {paths[len(outputs) - 1]}'s output: the stream is not "
                                  "carried from block to block, so the lens has no stream between them to decode")
        else:
            inputs = [i for i in inputs if value_root(trace, call.inputs[i]) in skips] or inputs
        pair = next(((i, o) for i in inputs for o, out in enumerate(call.outputs)
                     if nodes[out].shape == nodes[call.inputs[i]].shape and depends(trace, [out], {call.inputs[i]})),
                    None)
        if pair is None:
            raise ReslabError(f"block {path} returns no value shaped like its input and computed from it: no stream "
                              "passes through it for the lens to read")
        first = pair[0] if first < 0 else first
        outputs.append(pair[1])
        previous = value_root(trace, call.outputs[pair[1]])
    return first, outputs


def _logits(trace: Trace, last: int, block: str) -> tuple[str, int]:
    """(name, node) of the first model output computed from the last block's stream, one row per position."""
    for name, node_id in trace.outputs:
        if depends(trace, [node_id], {last}):
            shape, stream = trace.nodes[node_id].shape, trace.nodes[last].shape
            if shape is None or stream is None or len(shape) < 3 or shape[:2] != stream[:2]:
                raise ReslabError(f"the model's output {name!r} {tuple(shape or ())} is not one row of logits per "
                                  f"position of {block}'s stream {tuple(stream or ())}: no per-position "
                                  "unembedding reachable from the stream")
            return name, node_id
    raise ReslabError(f"no output of the model is computed from {block}'s output: no unembedding reachable from "
                      "the stream")


def _head(trace: Trace, logits: int, last: int, block: str):
    """(the head's node, the ops after it in forward order, the head's stream input): the learned linear map the
    logits come from, through ops with one computed input."""
    nodes, node, after = trace.nodes, trace.nodes[logits], []
    while not (node.uses_params and node.op in HEAD_OPS):
        data = [i for i in node.inputs if nodes[i].data]
        if node.role == "view" and node.through >= 0:
            data = [node.through]
        if len(data) != 1 or data[0] <= last:
            where = op_label(trace, node)
            raise ReslabError(f"no unembedding reachable from the stream: walking back from the logits, {where} is "
                              f"not a learned linear map of {block}'s output (linear, matmul or einsum with a weight)")
        if node.role != "view":
            after.append(node.id)
        node = nodes[data[0]]
    data = [i for i in node.inputs if nodes[i].data]
    if len(data) != 1:
        raise ReslabError(f"the head {op_label(trace, node)} reads {len(data)} computed values; the lens needs a "
                          "head that reads the stream alone")
    return node, after[::-1], data[0]


def _between(trace: Trace, start: int, end: int) -> set[int]:
    """The nodes on the paths from `start` to `end`, `end` included."""
    nodes, reached = trace.nodes, {start}
    for node in nodes[start + 1:end + 1]:
        if any(i in reached for i in node.inputs):
            reached.add(node.id)
    ancestors, stack = set(), [end]
    while stack:
        node_id = stack.pop()
        if node_id in ancestors or node_id <= start:
            continue
        ancestors.add(node_id)
        stack.extend(nodes[node_id].inputs)
    return (reached & ancestors) - {start}


def _names(trace: Trace, between: set[int], block_call: int, head_call: int) -> list[str]:
    """The modules that ran the ops between the stream and the head: for each op, its outermost enclosing call
    that runs neither the last block nor the head (model.norm, transformer.ln_f), else the op in its forward."""
    names: list[str] = []
    for node_id in sorted(between):
        node = trace.nodes[node_id]
        if node.role == "view" or node.call < 0:
            continue
        chain = trace.chain(node.call)
        own = next((c for c in chain if not trace.within(block_call, c) and not trace.within(head_call, c)), None)
        name = trace.calls[own].path if own is not None else op_label(trace, node)
        if name not in names:
            names.append(name)
    return names


def op_label(trace: Trace, node) -> str:
    path = trace.calls[node.call].path if node.call >= 0 else ""
    return f"{node.op} in {path or '(model)'}"


def _head_name(trace: Trace, node) -> str:
    """'lm_head (linear, weight lm_head.weight, bias lm_head.bias)': the module that ran the head, what it read."""
    read = []
    for node_id in node.inputs:
        while trace.nodes[node_id].role == "view" and trace.nodes[node_id].through >= 0:
            node_id = trace.nodes[node_id].through
        leaf = trace.nodes[node_id]
        if leaf.op == "param":
            read.append(f"{'weight' if len(leaf.shape or ()) >= 2 else 'bias'} {leaf.name}")
    path = trace.calls[node.call].path if node.call >= 0 else ""
    return f"{path or '(model)'} ({', '.join([node.op, *read])})"


# --- running the model: capture the streams, decode one ------------------------------------------------------------


class FrozenScales(TorchFunctionMode):
    """The final norm's per-position scales. Recording (`recorded` None), it keeps each scale op's statistic as the
    model computes it on its own stream; frozen, it puts those in place of what each scale op would compute on
    the decoded stream. It acts only once `armed` (after the last block) and, when `picks` is given, on the scale
    ops of that index among those it sees (the final norm's, as the trace found them)."""

    def __init__(self, picks: frozenset[int] | None = None, recorded: dict[int, torch.Tensor] | None = None):
        super().__init__()
        self.picks, self.recorded = picks, recorded
        self.armed = picks is None
        self.seen: dict[int, torch.Tensor] = {}
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = ops.op_name(func)[0]
        if not self.armed or name not in SCALE_OPS:
            return func(*args, **kwargs)
        index, self.count = self.count, self.count + 1
        if self.picks is not None and index not in self.picks:
            return func(*args, **kwargs)
        if self.recorded is None:
            out = func(*args, **kwargs)
            self.seen[index] = _statistic(name, args, kwargs) if name in ("layer_norm", "rms_norm") else out
            return out
        if index not in self.recorded:
            raise ReslabError("the final norm ran other scale ops on a decoded stream than on the model's own; "
                              "drop --frozen-norm")
        return _frozen(name, args, kwargs, self.recorded[index])


def _norm_args(name: str, args, kwargs) -> tuple[torch.Tensor, tuple[int, ...], Any, Any, float | None]:
    """(x, the normalised dims, weight, bias, eps) of a fused layer_norm / rms_norm call."""
    keys = ("input", "normalized_shape", "weight", "bias", "eps") if name == "layer_norm" else (
        "input", "normalized_shape", "weight", "eps")
    values = dict(zip(keys, args)) | kwargs
    dims = tuple(range(-len(values["normalized_shape"]), 0))
    return values["input"], dims, values.get("weight"), values.get("bias"), values.get("eps")


def _statistic(name: str, args, kwargs) -> torch.Tensor:
    """The per-position scale a fused norm divides by: sqrt(var + eps) (LayerNorm), sqrt(mean(x^2) + eps) (RMS)."""
    x, dims, _, _, eps = _norm_args(name, args, kwargs)
    x = x.float()
    if name == "layer_norm":
        return (x.var(dims, unbiased=False, keepdim=True) + (1e-5 if eps is None else eps)).sqrt()
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return (x.pow(2).mean(dims, keepdim=True) + eps).sqrt()


def _frozen(name: str, args, kwargs, statistic: torch.Tensor) -> torch.Tensor:
    """A scale op's result with the recorded statistic: the recorded value itself, or a fused norm dividing by it
    (LayerNorm still centres the stream by its own mean: centring is linear)."""
    if name not in ("layer_norm", "rms_norm"):
        return statistic
    x, dims, weight, bias, _ = _norm_args(name, args, kwargs)
    y = x.float()
    if name == "layer_norm":
        y = y - y.mean(dims, keepdim=True)
    y = y / statistic
    y = y * weight.float() if weight is not None else y
    y = y + bias.float() if bias is not None else y
    return y.to(x.dtype)


def _named_output(output: Any, name: str) -> torch.Tensor:
    tensors = {key or "output": tensor for key, tensor in named_tensors(output, "")}
    if name not in tensors:
        raise ReslabError(f"the model returned no {name!r} on this input, as it did while traced")
    return tensors[name]


class TracedLens:
    """The lens of a model that is not a reslab language model: its plan (`trace_plan`), then `capture` (the
    streams and the model's logits) and `decode` (one stream through everything after the last block)."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, plan: TracedPlan | None = None):
        refuse_meta(model)
        self.model = model
        self.plan = plan if plan is not None else trace_plan(model, tokens[:1, :TRACE_POSITIONS])
        modules = dict(model.named_modules())
        self.blocks = [modules[path] for path in self.plan.blocks]
        self.recorded: dict[int, torch.Tensor] = {}
        self.outputs: list[Any] | None = None  # each block's output on the captured pass, replayed by decodes

    def run(self, tokens: torch.Tensor, replace: torch.Tensor | None = None, capture: bool = False,
            scales: FrozenScales | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One forward: (the streams, if `capture`; the logits), the last block's output overwritten by `replace`."""
        streams: list[torch.Tensor] = []
        outputs: list[Any] = []
        plan, last = self.plan, len(self.blocks) - 1

        def enter(module, args, kwargs):
            streams.append(call_tensors(args, kwargs)[plan.stream_input].detach().clone())

        def leave(k):
            def hook(module, args, output):
                stream = [t for _, t in named_tensors(output, "")][plan.stream_outputs[k]]
                if k == last and replace is not None:
                    stream.copy_(replace)
                if capture:
                    streams.append(stream.detach().clone())
                    outputs.append(output)
                if k == last and scales is not None:
                    scales.armed = True
            return hook

        handles = [self.blocks[0].register_forward_pre_hook(enter, with_kwargs=True)] if capture else []
        handles += [block.register_forward_hook(leave(k)) for k, block in enumerate(self.blocks)]
        replay = self.replayed() if replace is not None and self.outputs is not None else nullcontext()
        try:
            with replay, scales if scales is not None else nullcontext():
                output = self.model(tokens)
        finally:
            for handle in handles:
                handle.remove()
        if capture:
            self.outputs = outputs
        return streams, _named_output(output, plan.output)

    @contextmanager
    def replayed(self):
        """Every block returns its output of the captured pass instead of computing it again: a decode, which
        overwrites the last block's stream anyway, then runs only what lies outside the blocks (the embedding,
        the final norm, the head): its cost is the tail's, not a forward's."""
        saved = [block.__dict__.get("forward") for block in self.blocks]
        for block, output in zip(self.blocks, self.outputs):
            block.forward = lambda *args, _output=output, **kwargs: _output
        try:
            yield
        finally:
            for block, forward in zip(self.blocks, saved):
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward

    def capture(self, tokens: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(the stream at every entry, the model's logits), the final norm's scales recorded, the tail checked."""
        scales = FrozenScales(self.plan.scales)
        streams, logits = self.run(tokens, capture=True, scales=scales)
        self.recorded = scales.seen
        if len(streams) != len(self.plan.names):
            raise ReslabError(f"{self.plan.model} ran its blocks {len(streams) - 1} times on this input, not "
                              f"{len(self.blocks)} as while traced; the lens needs each block run once")
        shape = tuple(streams[-1].shape)
        if shape[:2] != tuple(tokens.shape):
            raise ReslabError(f"{self.plan.blocks[-1]}'s stream is {shape}, not (batch, positions, ...) for tokens "
                              f"{tuple(tokens.shape)}; the lens reads a stream by position")
        check_logits(logits, tokens, self.plan.model)
        self.check_replay(tokens, streams[-1], logits)
        self.check_per_position(tokens, streams[-1], logits)
        return streams, logits

    def check_replay(self, tokens: torch.Tensor, stream: torch.Tensor, logits: torch.Tensor) -> None:
        """Decoding the model's own last stream with the blocks replayed must give the model's logits; where it
        does not (a tail that reads what a block left elsewhere), decodes run the whole model again."""
        _, again = self.run(tokens, replace=stream)
        if not torch.equal(again, logits):
            self.outputs = None

    def check_per_position(self, tokens: torch.Tensor, stream: torch.Tensor, logits: torch.Tensor) -> None:
        """Overwrite the last stream at the first position: that position's logits must move, no other's."""
        probe = stream.clone()
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(probe[:, 0].shape, generator=generator).to(probe.device, probe.dtype)
        probe[:, 0] = noise * (stream.float().std().item() + 1.0)
        _, moved = self.run(tokens, replace=probe)
        tail = ", ".join(self.plan.norm + [self.plan.head.split(" ")[0]])
        if torch.equal(moved[:, 0], logits[:, 0]):
            raise ReslabError(f"overwriting {self.plan.blocks[-1]}'s output does not change the logits: the head "
                              f"({tail}) does not read it")
        scale = logits.float().abs().max().item() + 1.0
        if tokens.shape[1] > 1 and not torch.allclose(moved[:, 1:].float(), logits[:, 1:].float(), rtol=0,
                                                       atol=1e-5 * scale):
            raise ReslabError(f"{tail} mixes positions: changing the stream at one position changes the logits at "
                              "others; the logit lens needs a per-position final norm and head")

    def decode(self, tokens: torch.Tensor, stream: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """The logits everything after the last block makes of `stream` (the final norm's scale frozen at the
        model's own last stream's, with `frozen`)."""
        if frozen and not self.recorded:
            norm = ", ".join(self.plan.norm) or "nothing"
            raise ReslabError(f"--frozen-norm: no per-position scale (rsqrt, sqrt, norm, layer_norm, rms_norm) runs "
                              f"between {self.plan.blocks[-1]} and the head (there: {norm}); drop --frozen-norm")
        scales = FrozenScales(self.plan.scales, self.recorded) if frozen else None
        return self.run(tokens, replace=stream, scales=scales)[1]


def refuse_meta(model: nn.Module) -> None:
    """The lens runs the model: one line for weights on the meta device (shapes, no values)."""
    if any(tensor.is_meta for tensor in (*model.parameters(), *model.buffers())):
        raise ReslabError(f"{type(model).__name__}'s weights are on the meta device (shapes, no values) and the lens "
                          "runs the model; build it on cpu or cuda (or to_empty() it and load weights)")


def check_logits(logits: torch.Tensor, tokens: torch.Tensor, model: str) -> None:
    """The lens scores every input id with finite logits: one line for NaN or inf, or a head narrower than the ids."""
    if not torch.isfinite(logits).all():
        raise ReslabError(f"{model}'s logits are not finite (NaN or inf) on this input; the lens compares finite "
                          "distributions: check the model's weights")
    if logits.shape[-1] <= int(tokens.max()):
        raise ReslabError(f"{model}'s logits score {logits.shape[-1]} tokens but the input holds token id "
                          f"{int(tokens.max())}; the head must score the whole vocabulary the embedding reads")


def frozen_decoder(norm: nn.Module, last: torch.Tensor):
    """`stream -> norm(stream)` with the norm's scale frozen at its value on `last` (a reslab model's final norm,
    read on the reduced stream); a ReslabError when the norm computes no per-position scale."""
    recorder = FrozenScales()
    with recorder:
        norm(last)
    if not recorder.seen:
        raise ReslabError(f"--frozen-norm: the final norm ({type(norm).__name__}) computes no per-position scale "
                          "(rsqrt, sqrt, norm, layer_norm, rms_norm); drop --frozen-norm")

    def decode(stream: torch.Tensor) -> torch.Tensor:
        with FrozenScales(None, recorder.seen):
            return norm(stream)
    return decode


__all__ = ["FrozenScales", "TracedLens", "TracedPlan", "call_tensors", "frozen_decoder", "plan_from_audit",
           "trace_plan"]
