"""Record the dataflow of one forward pass, with the module call that ran each operation.

Why not torch.fx or torch.export: they build a graph by symbolic tracing, so they fail on Python control flow
that depends on data, and they rewrite or drop module boundaries. reslab instead *runs* the model once under a
`TorchFunctionMode` that sees every torch call at the Python level (`x + y`, `torch.add`, `F.linear`, `add_`,
`x[i] = v`), and under forward hooks on every module, which give the call tree. The graph is therefore the path
actually taken, whatever branches the forward took, and it costs one forward pass. On the meta device that pass
allocates no storage at all, which is how a 7B-parameter configuration is audited in seconds.

Each tensor produced by a recorded op becomes a `Node`; tensors are mapped to nodes by identity (weakly, so the
trace does not keep activations alive). In-place ops give the tensor a new node, so a later reader sees the value
it really reads.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from reslab._torch_compat import view_base
from reslab.graph import ops


@dataclass(slots=True)
class Node:
    """One tensor value: a model input, a parameter or constant (leaves), or the result of one op."""

    id: int
    op: str  # leaves: "input", "param", "buffer", "const"; otherwise the normalised op name (see ops.op_name)
    inputs: tuple[int, ...]
    call: int  # the innermost module call that ran the op (-1 for leaves)
    shape: tuple[int, ...] | None
    data: bool  # depends on a model input
    param: bool = False  # computed from parameters only (a weight, or a weight cast or sliced)
    uses_params: bool = False  # combines data with a parameter: the op is learned computation
    role: str = "op"  # "leaf", "view", "scale", "gate", "mix" or "op" (see ops.py)
    through: int = -1  # view / scale / mix: the node whose value passes through
    operands: tuple[int, ...] = ()  # add / lerp / mul: positional operands in order, -1 for a python number
    scaled: bool = False  # an add with alpha != 1, or a subtraction
    name: str = ""  # leaves: the input, parameter or buffer name


@dataclass(slots=True)
class Call:
    """One execution of a module's forward. The calls form a tree (`parent`), which is not always the module tree:
    a residual site that runs `sublayer(x)` is that sublayer call's parent."""

    id: int
    path: str  # the module's name in the model ("" for the model itself)
    cls: str
    parent: int
    depth: int  # 0 for the model's own call
    start: int  # first node id recorded during the call
    end: int = -1  # one past the last node id recorded during the call
    inputs: tuple[int, ...] = ()
    outputs: tuple[int, ...] = ()


@dataclass(slots=True)
class ModuleInfo:
    path: str
    cls: str
    own_params: int  # number of parameter elements registered directly on this module
    subtree_params: int
    matrix: bool  # has a parameter with two or more dimensions somewhere in its subtree (a "sublayer", not a norm)
    children: tuple[str, ...]
    container: bool  # ModuleList / ModuleDict: holds parts, is never called itself
    in_sequence: bool  # a direct element of a ModuleList, ModuleDict or Sequential (a candidate block)
    norm: bool  # a normalisation layer (its class name says Norm)


@dataclass
class Trace:
    """The recorded forward pass: nodes in execution order (so ids are a topological order), calls, outputs."""

    model_cls: str
    nodes: list[Node]
    calls: list[Call]
    outputs: list[tuple[str, int]]  # (name in the returned structure, node id) for every returned tensor
    modules: dict[str, ModuleInfo]
    device: str
    control: list[int] = field(default_factory=list)  # nodes whose value Python read (see ops.CONTROL_READS)
    _users: list[list[int]] | None = field(default=None, repr=False)
    _live: list[bool] | None = field(default=None, repr=False)

    def users(self) -> list[list[int]]:
        """For each node, the nodes that read it."""
        if self._users is None:
            users: list[list[int]] = [[] for _ in self.nodes]
            for node in self.nodes:
                for source in node.inputs:
                    users[source].append(node.id)
            self._users = users
        return self._users

    def live(self) -> list[bool]:
        """For each node, whether its value reaches a model output or decides, through Python, what runs."""
        if self._live is None:
            live = [False] * len(self.nodes)
            stack = [node_id for _, node_id in self.outputs] + list(self.control)
            while stack:
                node_id = stack.pop()
                if not live[node_id]:
                    live[node_id] = True
                    stack.extend(self.nodes[node_id].inputs)
            self._live = live
        return self._live

    def chain(self, call_id: int) -> list[int]:
        """The call ids from the model's own call down to `call_id`."""
        chain = []
        while call_id >= 0:
            chain.append(call_id)
            call_id = self.calls[call_id].parent
        return chain[::-1]

    def within(self, call_id: int, ancestor: int) -> bool:
        """Is call `call_id` the call `ancestor` or nested inside it?"""
        while call_id >= 0:
            if call_id == ancestor:
                return True
            call_id = self.calls[call_id].parent
        return False

    def in_norm(self, node: Node) -> bool:
        """Did the op run inside a normalisation module (or is it a norm op itself)?"""
        if node.op in ops.NORM_OPS:
            return True
        return node.call >= 0 and self.modules[self.calls[node.call].path].norm


def named_tensors(value: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside a returned structure (tensor, tuple, list, dict, ModelOutput, dataclass), with a name.

    Objects of other types (a KV cache, a config) are not looked into: they are state, not outputs."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from named_tensors(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from named_tensors(item, f"{prefix}[{index}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from named_tensors(getattr(value, f.name), f"{prefix}.{f.name}" if prefix else f.name)


def _tensors(values, out: list) -> list:
    """Tensors among `values`, looking one or two levels into lists and tuples (torch.cat([a, b]))."""
    for value in values:
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            _tensors(value, out)
    return out


def call_tensors(args, kwargs) -> list[torch.Tensor]:
    """A call's tensor arguments in the order `Tracer.enter` records a call's inputs: positional, then keyword."""
    return _tensors(list(args) + list(kwargs.values()), [])


class TraceError(RuntimeError):
    """The forward pass failed while being traced; `path` names the module that was running."""

    def __init__(self, path: str, error: BaseException, on_meta: bool = False):
        hint = ""
        if on_meta:  # whatever the error says: a value read, or a kernel that refuses meta tensors' dtype
            hint = (" (on the meta device a forward cannot read tensor values, and some kernels refuse its tensors: "
                    "build the model and its inputs on cpu, or use --device cpu)")
        super().__init__(f"{type(error).__name__} in {path or 'the model'}: {error}{hint}")
        self.path = path
        self.error = error


class Recorder(TorchFunctionMode):
    """Sees every torch call of the forward pass and hands its inputs and outputs to the tracer."""

    def __init__(self, tracer: Tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except Exception:
            self.tracer.note_failure()
            raise
        self.tracer.record(func, args, kwargs, out)
        return out


class Tracer:
    """Builds a `Trace` while the model runs; `trace_model` is the way to use it."""

    def __init__(self, model: nn.Module):
        self.nodes: list[Node] = []
        self.calls: list[Call] = []
        self.stack: list[int] = []
        self.control: list[int] = []
        self.ids = WeakIdKeyDictionary()  # tensor -> node id
        self.failed_path: str | None = None
        self.paths: dict[int, str] = {}
        for path, module in model.named_modules(remove_duplicate=True):
            self.paths.setdefault(id(module), path)
        self.leaf_names: dict[int, tuple[str, str]] = {}  # id(tensor) -> (kind, name)
        for name, tensor in model.named_buffers(remove_duplicate=True):
            self.leaf_names[id(tensor)] = ("buffer", name)
        for name, tensor in model.named_parameters(remove_duplicate=True):
            self.leaf_names[id(tensor)] = ("param", name)

    # --- nodes -----------------------------------------------------------------------------------------------
    def leaf(self, tensor: torch.Tensor, kind: str | None = None, name: str = "") -> int:
        if kind is None:
            kind, name = self.leaf_names.get(id(tensor), ("const", ""))
        node = Node(len(self.nodes), kind, (), -1, tuple(tensor.shape), data=kind == "input", param=kind == "param",
                    role="leaf", name=name)
        self.nodes.append(node)
        self.ids[tensor] = node.id
        return node.id

    def node_of(self, tensor: torch.Tensor) -> int:
        node_id = self.ids.get(tensor)
        return self.leaf(tensor) if node_id is None else node_id

    def record(self, func, args, kwargs, out) -> None:
        name, inplace = ops.op_name(func)
        inplace = inplace or kwargs.get("inplace") is True  # F.relu(x, inplace=True): a new value of x, not x
        if name in ops.IGNORED_OPS:
            return
        if name in ops.CONTROL_READS and not isinstance(out, torch.Tensor):
            if args and isinstance(args[0], torch.Tensor):
                self.control.append(self.node_of(args[0]))
            return
        if name == "setitem":  # x[index] = value: a new value of x, read from the old one and from value
            outs = [args[0]]
        elif isinstance(out, torch.Tensor):
            outs = [out]
        elif isinstance(out, (tuple, list)):
            outs = [item for item in out if isinstance(item, torch.Tensor)]
        else:
            return
        if not outs:
            return
        given = _tensors(args, [])
        _tensors(kwargs.values(), given)
        if not inplace and len(outs) == 1 and any(outs[0] is t for t in given):
            return  # the op returned its input unchanged (x.to(x.dtype), dropout in eval): same value, same node
        if name in ops.SHAPE_ONLY_OPS:
            inputs: tuple[int, ...] = ()
        elif name == "copy" and inplace:  # dst.copy_(src) overwrites dst entirely
            inputs = tuple(self.node_of(t) for t in given[1:])
        else:
            inputs = tuple(self.node_of(t) for t in given)
        nodes = self.nodes
        data = any(nodes[i].data for i in inputs)
        param = any(nodes[i].param for i in inputs)
        role, through, operands, scaled = self.classify(name, args, kwargs, outs[0])
        call = self.stack[-1] if self.stack else -1
        for tensor in outs:
            node = Node(len(nodes), name, inputs, call, tuple(tensor.shape), data, param and not data,
                        data and param, role, through, operands, scaled)
            nodes.append(node)
            self.ids[tensor] = node.id
        base = view_base(outs[0]) if inplace else None
        if base is not None and base in self.ids:
            # Writing into a view changes its base too: later readers of the base must depend on this op.
            node = Node(len(nodes), "view_update", (self.ids[base], nodes[-1].id), call, tuple(base.shape), True,
                        False, False)
            nodes.append(node)
            self.ids[base] = node.id

    def classify(self, name: str, args, kwargs, out: torch.Tensor) -> tuple[str, int, tuple[int, ...], bool]:
        """The op's role for the residual rules: (role, through, operands, scaled); see `Node`."""
        if (name in ops.VIEW_OPS or (name in ops.SLICE_OPS and ops.is_slice(name, args, out))
                or (name == "pad" and ops.is_zero_pad(args, kwargs))):
            first = args[0] if args else kwargs.get("input")
            if isinstance(first, torch.Tensor):
                return "view", self.ids.get(first, -1), (), False
            return "op", -1, (), False
        if name in ("add", "sub", "lerp", "mul", "div"):
            names = ("input", "end", "weight") if name == "lerp" else ("input", "other")
            values = [args[i] if i < len(args) else kwargs.get(key) for i, key in enumerate(names)]
            operands = tuple(self.ids.get(v, -1) if isinstance(v, torch.Tensor) else -1 for v in values)
            if name in ("add", "sub"):  # x - y adds y scaled by -1
                return "op", -1, operands, name == "sub" or kwargs.get("alpha", 1) != 1
            if name in ("mul", "div"):
                return self.classify_product(name, values, operands)
            return "op", -1, operands, False
        if name in ("matmul", "rmatmul", "einsum"):
            return self.classify_mix(name, args, out)
        return "op", -1, (), False

    def classify_product(self, name: str, values, operands) -> tuple[str, int, tuple[int, ...], bool]:
        """x * c with c a scalar or a per-channel factor not computed from data is a *scale* of x; the product of
        two data tensors is a *gate* (one may gate the other, as in highway networks)."""
        nodes = self.nodes
        is_data = [isinstance(v, torch.Tensor) and operands[i] >= 0 and nodes[operands[i]].data
                   for i, v in enumerate(values)]
        pairs = [(0, 1), (1, 0)] if name == "mul" else [(0, 1)]
        for keep, factor in pairs:
            x, c = values[keep], values[factor]
            if not is_data[keep] or is_data[factor]:
                continue
            if ops.is_scalar(c) or (isinstance(c, torch.Tensor) and ops.is_per_channel(c, x)):
                return "scale", operands[keep], operands, False
        if name == "mul" and all(is_data):
            return "gate", -1, operands, False
        return "op", -1, operands, False

    def classify_mix(self, name: str, args, out: torch.Tensor) -> tuple[str, int, tuple[int, ...], bool]:
        """M @ X, or an einsum, that keeps the data X's shape and its channel index: a mix of parallel streams (the
        hyper-connection read/write matrices), which a multi-stream skip passes through. An einsum may also change
        the size of one axis, the streams: n in, m out (the branch input and the mixed streams made by one einsum,
        `[A_m | A_r]^T H`, as the hyper-connections package does)."""
        if name == "einsum":
            tensors = [a for a in args[1:] if isinstance(a, torch.Tensor)]
            if len(args) == 2 and isinstance(args[1], (list, tuple)):
                tensors = list(args[1])
            index = ops.einsum_stream_operand(args[0]) if isinstance(args[0], str) and len(tensors) == 2 else None
            stream = tensors[index] if index is not None else None
            axes = 1
        else:
            stream = args[1] if name == "matmul" else args[0]  # rmatmul(x, m) is m @ x
            axes = 0
        node_id = self.ids.get(stream, -1) if isinstance(stream, torch.Tensor) else -1
        if node_id >= 0 and self.nodes[node_id].data and ops.keeps_streams(stream.shape, out.shape, axes):
            return "mix", node_id, (), False
        return "op", -1, (), False

    # --- module calls ------------------------------------------------------------------------------------------
    def enter(self, module: nn.Module, args, kwargs) -> None:
        parent = self.stack[-1] if self.stack else -1
        depth = self.calls[parent].depth + 1 if parent >= 0 else 0
        inputs = tuple(self.node_of(t) for t in call_tensors(args, kwargs))
        call = Call(len(self.calls), self.paths.get(id(module), "?"), type(module).__name__, parent, depth,
                    len(self.nodes), inputs=inputs)
        self.calls.append(call)
        self.stack.append(call.id)

    def leave(self, module: nn.Module, args, kwargs, output) -> None:
        if sys.exc_info()[0] is not None:  # the forward raised: remember where, once
            self.note_failure()
        if not self.stack:
            return
        call = self.calls[self.stack.pop()]
        call.end = len(self.nodes)
        call.outputs = tuple(self.node_of(t) for _, t in named_tensors(output, ""))

    def note_failure(self) -> None:
        if self.failed_path is None:
            self.failed_path = self.calls[self.stack[-1]].path if self.stack else ""


def describe_modules(model: nn.Module) -> dict[str, ModuleInfo]:
    """Every module by path. A module registered under two paths (a model list holds a layer that a wrapper holds
    too) is described once, under the first path `named_modules` gives, which its calls are recorded under too; it is
    the child of that path's parent only, so `children` form a tree of described paths."""
    sequences = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
    named = dict(model.named_modules(remove_duplicate=True))
    infos: dict[str, ModuleInfo] = {}
    parent_of: dict[str, nn.Module] = {}
    for path, module in named.items():
        for name, _ in module.named_children():
            parent_of.setdefault(f"{path}.{name}" if path else name, module)
    for path, module in named.items():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        params = list(module.parameters())
        children = tuple(child for child in (f"{path}.{name}" if path else name for name, _ in module.named_children())
                         if child in named)
        infos[path] = ModuleInfo(
            path=path, cls=type(module).__name__, own_params=own, subtree_params=sum(p.numel() for p in params),
            matrix=any(p.dim() >= 2 for p in params), children=children,
            container=isinstance(module, (nn.ModuleList, nn.ModuleDict)),
            in_sequence=isinstance(parent_of.get(path), sequences), norm="Norm" in type(module).__name__,
        )
    return infos


def trace_model(model: nn.Module, example_inputs: Any) -> Trace:
    """Run `model` once on `example_inputs` (a tuple of positional arguments, a dict of keyword arguments, or one
    tensor) and record its dataflow. Gradients are off; the model's train/eval mode is left as it is."""
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = tuple(example_inputs), {}
    tracer = Tracer(model)
    positional = {("input" if len(args) == 1 else f"input{i}"): a for i, a in enumerate(args)}
    for name, tensor in named_tensors({**positional, **kwargs}, ""):
        if tensor not in tracer.ids:
            tracer.leaf(tensor, "input", name)
    handles = []
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(tracer.enter, with_kwargs=True))
            handles.append(module.register_forward_hook(tracer.leave, with_kwargs=True, always_call=True))
        with torch.no_grad(), Recorder(tracer):
            output = model(*args, **kwargs)
    except Exception as error:
        on_meta = any(p.is_meta for p in model.parameters()) or any(
            t.is_meta for _, t in named_tensors({**positional, **kwargs}, ""))
        raise TraceError(tracer.failed_path or "", error, on_meta) from error
    finally:
        for handle in handles:
            handle.remove()
    outputs = [(name or "output", tracer.node_of(t)) for name, t in named_tensors(output, "")]
    device = next((str(p.device) for p in model.parameters()), "cpu")
    return Trace(type(model).__name__, tracer.nodes, tracer.calls, outputs, describe_modules(model), device,
                 tracer.control)
