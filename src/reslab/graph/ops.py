"""What the audit needs to know about individual torch operations, by name.

The tracer records each call under a normalised name (`Tensor.__iadd__`, `torch.add` and `Tensor.add_` are all
`add`; in-place-ness is kept separately). The tables below are the only place that knows op names; the residual
rules in `audit.py` speak of roles: a *view* passes the stream through unchanged in value (reshape, cast,
dropout), a *scale* multiplies it by a scalar or a per-channel factor, a *mix* recombines parallel streams
without touching the channel dimension (multi-stream residuals), a *gate* multiplies two data tensors.
"""

from __future__ import annotations

from numbers import Number

import torch

# Ops whose output carries the same values as their (first) input, up to shape, dtype, layout or dropout.
VIEW_OPS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose",
    "permute", "t", "T", "mT", "contiguous", "expand", "expand_as", "to", "type", "type_as", "float", "double",
    "half", "bfloat16", "clone", "detach", "data", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "identity",
})
# Ops that cut a part out of their input without changing its rank: a skip may pass through them (Reformer's
# `X1, X2 = chunk(cat([h, h]))`). A slice that drops a dimension (`x[:, t]`, a scan loop's step) is no view.
SLICE_OPS = frozenset({"getitem", "chunk", "split", "split_with_sizes", "tensor_split", "narrow"})
# The elementwise adds a residual can be made of; `sub` is an add of the negated operand (backout's `x - lambda h`).
ADD_OPS = frozenset({"add", "sub", "lerp"})
SUM_OPS = frozenset({"add", "addcmul"})  # the steps of a weighted sum term by term (DenseFormer, MUDD)
# Ops that pick one slice of a leading axis and drop it: a row of a stack of streams (MUDD's Q, K, V, R)
ROW_OPS = frozenset({"unbind"})
NORM_OPS = frozenset({"layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm", "local_response_norm"})
# Ops that are linear maps of their data input: a skip path made only of these (plus views) is a *projection*
# shortcut (ResNet's 1x1 conv + BN downsampling); a branch made only of these is no residual branch (LoRA).
LINEAR_OPS = frozenset({
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "batch_norm", "avg_pool1d",
    "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "matmul", "mm", "bmm", "einsum",
    "add", "sub", "neg", "mul", "div", "sum", "mean", "cat", "stack", "split", "chunk", "getitem", "addmm",
})
# Ops that create a tensor from another one's shape only: their output does not depend on the input's values.
SHAPE_ONLY_OPS = frozenset({
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like", "new_zeros",
    "new_ones", "new_empty", "new_full", "new_tensor",
})
# Results that are not tensor dataflow (shapes, dtypes, python scalars): never recorded.
IGNORED_OPS = frozenset({
    "shape", "dtype", "device", "size", "dim", "ndim", "numel", "is_floating_point", "is_complex", "element_size",
    "stride", "storage_offset", "is_contiguous", "layout", "requires_grad", "is_leaf", "grad_fn", "len", "repr",
    "format", "hash", "data_ptr", "untyped_storage", "get_device", "is_meta", "is_cuda", "is_cpu", "names",
    "nbytes", "itemsize", "grad", "_base", "_version", "is_sparse", "is_quantized",
})
# Python reading a tensor's value (`if t:`, `int(t)`, `t.item()`): the value decides what runs next, so whatever
# it was computed from is used, even when no output depends on it through tensors (an MoE router).
CONTROL_READS = frozenset({"bool", "int", "float", "index", "item", "tolist", "complex"})

_DUNDER = {
    "add": "add", "radd": "add", "iadd": "add", "mul": "mul", "rmul": "mul", "imul": "mul", "truediv": "div",
    "itruediv": "div", "div": "div", "idiv": "div", "rtruediv": "rdiv", "sub": "sub", "isub": "sub", "rsub": "rsub",
    "matmul": "matmul", "rmatmul": "rmatmul", "imatmul": "matmul", "getitem": "getitem", "setitem": "setitem",
    "neg": "neg", "pow": "pow", "rpow": "rpow", "ipow": "pow", "floordiv": "floordiv", "mod": "remainder",
}
_INPLACE_DUNDER = frozenset({"iadd", "imul", "itruediv", "idiv", "isub", "imatmul", "ipow", "setitem"})
_names: dict[object, tuple[str, bool]] = {}


def op_name(func) -> tuple[str, bool]:
    """(normalised name, in place?) of a function seen by `__torch_function__`; cached per function."""
    try:
        return _names[func]
    except (KeyError, TypeError):
        pass
    name = getattr(func, "__name__", None) or type(func).__name__
    inplace = False
    if name == "__get__":  # a Tensor property, e.g. Tensor.T or Tensor.shape
        name = getattr(getattr(func, "__self__", None), "__name__", "property")
    elif name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        inplace = core in _INPLACE_DUNDER
        name = _DUNDER.get(core, core)
    elif name.endswith("_") and not name.startswith("_"):
        name, inplace = name[:-1], True
    result = (name.lstrip("_") or name, inplace)
    try:
        _names[func] = result
    except TypeError:
        pass
    return result


def is_scalar(value) -> bool:
    """A python number or a one-element tensor: multiplying the stream by it is a *scaling*."""
    if isinstance(value, Number):
        return True
    return isinstance(value, torch.Tensor) and value.numel() == 1


def is_per_channel(factor: torch.Tensor, x: torch.Tensor) -> bool:
    """True when `factor` broadcasts against `x` with one value per index of a single axis of `x` and size 1 on
    every other axis: LayerScale (`gamma * x`, the last axis), or a channels-first scale (Mamba's
    `x * D[None, :, None]`, PoolFormer's `gamma[:, None, None] * x`)."""
    if factor.dim() == 0 or x.dim() == 0 or factor.dim() > x.dim():
        return False
    sized = [(axis, size) for axis, size in enumerate(factor.shape, start=x.dim() - factor.dim()) if size != 1]
    return len(sized) == 1 and x.shape[sized[0][0]] == sized[0][1]


def is_zero_pad(args, kwargs) -> bool:
    """`F.pad(x, pad)` with zeros: x's values pass through, with zeros around them (Mamba-2's chunk padding)."""
    mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
    value = args[3] if len(args) > 3 else kwargs.get("value", None)
    return mode == "constant" and not value


def is_slice(name: str, args, out: torch.Tensor) -> bool:
    """Does a slicing op keep its input's rank, with no tensor in the index (which would gather, not slice)?
    `split`, `chunk`, `tensor_split` and `narrow` always slice: their second argument is sizes or sections."""
    first = args[0] if args else None
    if not isinstance(first, torch.Tensor) or first.dim() != out.dim():
        return False
    if name != "getitem":
        return True
    index = args[1] if len(args) > 1 else ()
    index = index if isinstance(index, tuple) else (index,)
    return not any(isinstance(item, (torch.Tensor, list)) for item in index)


def einsum_stream_operand(equation: str) -> int | None:
    """For a two-operand einsum, the operand whose channel (last) index passes straight to the output's last
    position without being touched by the other operand: the einsum then mixes streams, not channels."""
    if "->" not in equation:
        return None
    lhs, out = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != 2 or not out:
        return None
    for index, term in enumerate(terms):
        other = terms[1 - index]
        if term[-1:].isalpha() and term[-1] == out[-1] and term[-1] not in other:
            return index
    return None


def keeps_streams(stream: torch.Size, out: torch.Size, changed_axes: int) -> bool:
    """Does a stream mix's output keep its streams' rank and channel size, and every axis's size but at most
    `changed_axes` of them (the number of streams)?"""
    if len(stream) < 2 or len(stream) != len(out) or stream[-1] != out[-1]:
        return False
    return sum(a != b for a, b in zip(stream, out, strict=True)) <= changed_axes
