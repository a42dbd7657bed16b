"""Find the residual connections in a trace, from the dataflow alone.

Definition (issue 5). A *residual connection* is an elementwise add (`+`, `+=`, `torch.add`, `add_`, `lerp`) in
which one operand, the *skip*, is a stream value `x` passed at most through value-preserving ops (views, casts,
dropout, scaling by a scalar or per-channel factor, the stream mixes of multi-stream schemes), and the other
operand, the *branch*, was computed from that same `x` through learned computation (an op that combines data
with a parameter). So a bias add, `token + position` embeddings, a mask add or RoPE's `q*cos + rot(q)*sin` are
not residuals: in none of them does one side flow into the other through a parameter.

The skip and the branch meet at their nearest common ancestor: the first value on the skip's walk back that the
branch also reads. The add is judged there alone (learned computation on the branch after it, or no residual),
so a learned op on the skip path is never also the branch's (GPT-2's tanh GELU `h + 0.044715 * h**3` after a
Linear is no residual). Two branches that both read the stream, summed, are one residual: the add that brings the
stream in (parallel attention + MLP, routed + shared experts); see docs/audit.md.

Kinds, checked in this order (the first that applies wins):

- `multi-stream`: the skip passes through a mix of parallel streams (hyper-connections' `A_r^T H`).
- `projection`: the skip itself goes through an affine learned map (ResNet's 1x1 conv + BN downsampling): linear
  maps, batch norm or pooling only, never with a gate or a stream mix, around a deeper (nonlinear) branch.
- `normalized`: everything that reads the sum is a normalisation inside the same module (post-LN, DeepNorm),
  so the un-normalised stream never travels on.
- `gated`: the skip or the branch is multiplied by a data-dependent gate (highway networks, `lerp` with a
  computed weight).
- `scaled`: the skip or the branch is multiplied by a fixed or learned scalar or per-channel factor (ReZero,
  LayerScale, `torch.add(..., alpha=)`, `lerp` with a constant weight).
- `identity`: `x + F(x)` as it stands (pre-LN, GPT-2, Llama).

A subtraction is an add of the negated operand; `depth.py` keeps it only as a connection across depth (backout).
`depth.py` also names and classifies the residuals that reach over whole blocks (`ACROSS_KINDS`), and finds dense
sums and value embeddings, which this rule cannot see.

Depth attention (attention residuals) has no add: the stream is a stack of the earlier stream values (the
embedding, the sublayer outputs), each sublayer reads a data-weighted sum over that stack, and its output joins
the stack (`cat`). That cat is reported as the residual, kind

- `depth-attention`: a `cat` extends a stack `S` with a value computed through learned computation from a read
  of that same `S`: a matmul with data-dependent weights that contracts the stack axis (`softmax(..) @ S`), or the
  selection of its only element. `S` must come into the module that reads it from outside (a stream value), so
  ordinary attention (`attn @ v`, `v` a projection made inside the attention module, never extended by the
  attention output) and a KV cache are not depth attention.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from reslab.graph import ops
from reslab.graph.trace import Node, Trace

# Connections across depth (`depth.py`): a skip from the stream at a block boundary over one or more whole blocks,
# a dense sum of block outputs, a token-indexed table added inside a block.
ACROSS_KINDS = ("embedding re-injection", "long skip", "backout", "dense", "value embedding")
KINDS = ("identity", "scaled", "gated", "normalized", "multi-stream", "projection", "depth-attention", *ACROSS_KINDS)
_PROJECTION_STEPS = 3  # conv + BN, or pool + conv + BN
_WALK_LIMIT = 256  # nodes a skip walk may visit before it gives up


@dataclass(frozen=True)
class Residual:
    owner: str  # the innermost module whose forward performs the add ("" for the model itself)
    skip_from: str  # where x leaves the stream: "PATH:in", "PATH:out", or "PATH:OP" (made by op OP in PATH's forward);
    # the model itself is named "(model)" here
    wraps: tuple[str, ...]  # the learned modules on the branch, outermost first, in execution order
    kind: str
    add: int = field(default=-1, compare=False)  # the add's node id in the trace
    skip: int = field(default=-1, compare=False)  # x's node id
    branch: int = field(default=-1, compare=False)  # the add's other operand (F(x)), -1 when there is none
    # multi-stream and gated residuals: the weights that mix, gate or scale the skip or the branch on their way into
    # the add, (side, role, shape)
    mixing: tuple[tuple[str, str, tuple[int, ...]], ...] = field(default=(), compare=False)

    def to_dict(self) -> dict:
        record = {"owner": self.owner, "skip_from": self.skip_from, "wraps": list(self.wraps), "kind": self.kind}
        if self.mixing:  # multi-stream and gated residuals: what their weights look like
            record["mixing"] = [{"on": side, "role": role, "shape": list(shape)} for side, role, shape in self.mixing]
        return record


def find_residuals(trace: Trace, exclude: frozenset[int] = frozenset()) -> list[Residual]:
    """Every residual connection in the traced pass by the rules above, in execution order; the adds in `exclude`
    are left to other rules (`depth.py`: the sums of a dense connection, value embeddings)."""
    found = []
    for node in trace.nodes:
        if node.id in exclude:
            continue
        if node.op in ops.ADD_OPS and node.data and len(node.operands) >= 2:
            residual = _match(trace, node)
            if residual is not None:
                found.append(residual)
        elif node.op == "cat" and node.data and len(node.inputs) >= 2:
            residual = _match_depth_attention(trace, node)
            if residual is not None:
                found.append(residual)
    return _without_partial_sums(trace, found)


def _without_partial_sums(trace: Trace, found: list[Residual]) -> list[Residual]:
    """A projection shortcut whose sum a later residual of the same stream brings the stream into is no residual of
    its own: it sums two branches of that residual (LAuReL's `x + (F(LN x) + W_R W_L x)`, the low-rank map beside
    the sublayer), as parallel branches are (see the module doc)."""
    kept = []
    for residual in found:
        if residual.kind == "projection" and any(
                other.add > residual.add and other.kind != "projection" and other.branch >= 0
                and not _same_value(trace, other.skip).isdisjoint(_same_value(trace, residual.skip))
                and (other.branch == residual.add or _branch(trace, residual.add, other.branch) is not None)
                for other in found):
            continue
        kept.append(residual)
    return kept


def _match_depth_attention(trace: Trace, cat: Node) -> Residual | None:
    """`cat([S, F(read(S))])` along S's stack axis, `read` a data-weighted sum over the axis (see the module doc)."""
    nodes = trace.nodes
    for skip_side in dict.fromkeys(cat.inputs):
        for new_side in dict.fromkeys(cat.inputs):
            if new_side == skip_side or not (nodes[skip_side].data and nodes[new_side].data):
                continue
            axis = _stack_axis(nodes[skip_side].shape, cat.shape)
            if axis is None:
                continue
            for root in _stack_roots(trace, skip_side):  # block AttnRes slices off the open block, S[..., :-1, :]
                shape = nodes[root].shape
                if shape is None or len(shape) != len(cat.shape) or any(
                        a != b for i, (a, b) in enumerate(zip(shape, cat.shape, strict=True)) if i != axis):
                    continue
                branch = _branch(trace, root, new_side)
                if branch is None or not _learned(trace, branch, cat):
                    continue
                if not any(_depth_read(trace, nodes[i], root, axis) for i in branch):
                    continue
                return _describe(trace, cat, root, new_side, branch, frozenset(), kind="depth-attention")
    return None


def _stack_roots(trace: Trace, start: int):
    """The stack a cat operand carries on: the operand itself, and what it is a view or a slice of."""
    nodes, node_id = trace.nodes, start
    for _ in range(_PROJECTION_STEPS + 1):
        if node_id < 0 or not nodes[node_id].data:
            return
        yield node_id
        node = nodes[node_id]
        if node.role == "view":
            node_id = node.through
        elif node.op == "getitem" and node.inputs:
            node_id = node.inputs[0]
        else:
            return


def _stack_axis(stack: tuple[int, ...] | None, out: tuple[int, ...] | None) -> int | None:
    """The one axis along which the cat made the stack longer (as a non-negative index)."""
    if stack is None or out is None or len(stack) != len(out) or len(stack) < 2:
        return None
    grown = [i for i, (a, b) in enumerate(zip(stack, out, strict=True)) if a != b]
    return grown[0] if len(grown) == 1 and out[grown[0]] > stack[grown[0]] else None


def _through_views(trace: Trace, node_id: int) -> int:
    nodes = trace.nodes
    while node_id >= 0 and nodes[node_id].role == "view":
        node_id = nodes[node_id].through
    return node_id


def _depth_read(trace: Trace, node: Node, root: int, axis: int) -> bool:
    """Is `node` a read of the stack `root` over its stack axis, in a module the stack came into from outside?"""
    nodes = trace.nodes
    stack, base = nodes[root], _through_views(trace, root)
    if stack.call >= 0 and node.call >= 0 and trace.within(stack.call, node.call):
        return False  # the stack was made where it is read (attention's `attn @ v`, a KV cache)
    if node.op == "matmul" and len(node.inputs) == 2 and axis == len(stack.shape) - 2:
        weights, values = node.inputs
        return (_through_views(trace, values) == base and nodes[weights].data and
                bool(nodes[weights].shape) and nodes[weights].shape[-1] == stack.shape[axis])
    if node.op == "getitem" and node.inputs and _through_views(trace, node.inputs[0]) == base:
        return stack.shape[axis] == 1  # the first sublayer: one source, weight 1
    return False


def _match(trace: Trace, add: Node) -> Residual | None:
    a, b = add.operands[:2]
    pairs = [(a, b)] if add.op == "lerp" else [(a, b), (b, a)]  # lerp(start, end, w): start is the skip
    for skip_side, branch_side in pairs:
        if skip_side < 0 or branch_side < 0:
            continue
        meeting: set[int] | None = None
        for root, flags, steps in _skip_roots(trace, skip_side):
            if meeting is not None and root not in meeting:
                continue
            branch = _branch(trace, root, branch_side)
            if branch is None:
                continue
            # The nearest value on the skip path that the branch reads is where skip and branch meet (their nearest
            # common ancestor): what lies before it is shared, so it is neither the skip's nor the branch's. Views
            # of one value are that value: `x.transpose()` read by both sides meets at `x` if `x` is read as well.
            if _learned(trace, branch, add) and ("projection" not in flags or _deeper(trace, branch, steps)):
                return _describe(trace, add, root, branch_side, branch, flags)
            if meeting is None:
                meeting = _same_value(trace, root)
    return None


def _same_value(trace: Trace, node_id: int) -> set[int]:
    """`node_id` and the values it is a pure view of (reshapes, casts, a slice that keeps the whole; not slices
    that keep only a part)."""
    nodes, found = trace.nodes, set()
    while node_id >= 0 and node_id not in found:
        found.add(node_id)
        node = nodes[node_id]
        if node.role != "view" or (node.op in ops.SLICE_OPS and node.shape != nodes[node.through].shape):
            break
        node_id = node.through
    return found


def _skip_roots(trace: Trace, start: int):
    """Candidate stream values x for a skip operand, nearest first, with what the skip path does to them and how
    many learned linear maps it holds. A projection is an affine map: a gate (a data-dependent product) or a mix
    of streams never joins one, and a normalisation's internal `x * rsqrt(var)` is no gate."""
    nodes = trace.nodes
    queue = deque([(start, frozenset(), 0)])
    seen = set()
    while queue and len(seen) < _WALK_LIMIT:
        node_id, flags, steps = queue.popleft()
        if node_id < 0 or (node_id, flags) in seen:
            continue
        seen.add((node_id, flags))
        node = nodes[node_id]
        if node.data:
            yield node_id, flags, steps
        for nxt, flag, step in _skip_steps(trace, node):
            if flag and not flags.isdisjoint(_EXCLUSIVE.get(flag, ())):
                continue
            if steps + step <= _PROJECTION_STEPS:
                queue.append((nxt, flags | {flag} if flag else flags, steps + step))


# A skip that goes through a learned linear map is a projection shortcut only when nothing else on it is.
_EXCLUSIVE = {"projection": ("gated", "mixed"), "gated": ("projection",), "mixed": ("projection",)}


def _skip_steps(trace: Trace, node: Node) -> list[tuple[int, str, int]]:
    """Where a skip walk goes back to from `node`: (node id, flag it adds, learned maps it crosses)."""
    if node.role == "view":
        source = trace.nodes[node.through] if node.through >= 0 else None
        if source is not None and source.role == "mix" and node.op in ops.SLICE_OPS:
            # Some rows of a stream mix are a mix of the streams too, however the branch reads the others:
            # `mixed = [A_m | A_r]^T H`, `x = mixed[..., 1:, :]` passes through the mix to H.
            return [(source.through, "mixed", 0)]
        return [(node.through, "", 0)]
    if node.role == "scale":
        return [(node.through, "scaled", 0)]
    if node.role == "mix":
        return [(node.through, "mixed", 0)]
    if node.op in ops.ROW_OPS and node.inputs and trace.nodes[node.inputs[0]].data:
        # one row of a stack of streams mixed together, the branch reading the other rows (MUDD's R beside Q, K, V)
        return [(node.inputs[0], "mixed", 0)]
    if node.role == "gate" and not trace.in_norm(node):
        return [(operand, "gated", 0) for operand in node.operands]
    if _projection_step(node):
        data_inputs = [i for i in node.inputs if trace.nodes[i].data]
        if len(data_inputs) == 1:
            return [(data_inputs[0], "projection", 1)]
    return []


def _projection_step(node: Node) -> bool:
    if node.op.startswith(("avg_pool", "adaptive_avg_pool")):
        return True
    return node.uses_params and node.op in ("linear", "conv1d", "conv2d", "conv3d", "batch_norm")


def _deeper(trace: Trace, branch: set[int], skip_maps: int) -> bool:
    """A projection shortcut's branch is the deeper path: nonlinear, and more learned ops than the shortcut (two
    linear maps of x added together, LoRA's `base(x) + b(a(x))`, are one linear map, not a skip)."""
    nodes = trace.nodes
    learned = sum(1 for i in branch if nodes[i].uses_params and nodes[i].role != "scale")
    return _nonlinear(trace, branch) and learned > skip_maps


def _branch(trace: Trace, root: int, target: int) -> set[int] | None:
    """The nodes on some path from `root` to `target` (target included), or None if target does not read root.

    Node ids are a topological order, so only ids between the two need to be looked at."""
    if target <= root:
        return None
    nodes = trace.nodes
    region, stack, reaches = set(), [target], False
    while stack:
        node_id = stack.pop()
        if node_id in region:
            continue
        region.add(node_id)
        for source in nodes[node_id].inputs:
            if source == root:
                reaches = True
            elif source > root and source not in region:
                stack.append(source)
    if not reaches:
        return None
    on = set()
    for node_id in sorted(region):
        if any(source == root or source in on for source in nodes[node_id].inputs):
            on.add(node_id)
    return on


def _learned(trace: Trace, branch: set[int], add: Node) -> bool:
    """Does the branch hold learned computation? A scaling coefficient in the add's own forward (`alpha * F(x)`)
    does not count: `x + alpha * x` is a rescaled x, not a residual."""
    nodes = trace.nodes
    for node_id in branch:
        node = nodes[node_id]
        if node.uses_params and (node.role != "scale" or not trace.within(add.call, node.call)):
            return True
    return False


def _nonlinear(trace: Trace, branch: set[int]) -> bool:
    nodes = trace.nodes
    return any(nodes[i].role not in ("view", "scale") and nodes[i].op not in ops.LINEAR_OPS for i in branch)


def _describe(trace: Trace, add: Node, root: int, branch_side: int, branch: set[int], flags,
              kind: str | None = None) -> Residual:
    nodes, calls = trace.nodes, trace.calls
    starts = [u for u in trace.users()[root] if u in branch or u == add.id]
    lca = _common_call(trace, [nodes[u].call for u in starts] + [add.call])
    kind = kind or _kind(trace, add, branch_side, flags)
    return Residual(
        owner=calls[add.call].path if add.call >= 0 else "",
        skip_from=_boundary(trace, root, lca),
        wraps=_wraps(trace, branch, add, lca),
        kind=kind,
        add=add.id,
        skip=root,
        branch=branch_side,
        mixing=_mixing(trace, add, root, branch_side) if kind in MIXED_KINDS else (),
    )


_WEIGHING = ("mix", "gate", "scale")
MIXED_KINDS = ("multi-stream", "gated")  # the residuals whose JSON gives the shapes of their weights


def _mixing(trace: Trace, add: Node, root: int, branch_side: int) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """The tensors that mix, gate or scale the skip (from the add back to x) and the branch's output (its tail into
    the add), each once: (side, role, shape). Python numbers are not tensors and are left out."""
    nodes, found = trace.nodes, []
    sides = [("skip", operand) for operand in add.operands if operand >= 0 and operand != branch_side][:1]
    sides += [("branch", branch_side)] if branch_side >= 0 else []
    for side, node_id in sides:
        for _ in range(_WALK_LIMIT):
            if node_id < 0 or node_id == root:
                break
            node = nodes[node_id]
            if node.role in _WEIGHING:
                for weight in dict.fromkeys(i for i in node.inputs if i != node.through):
                    shape = nodes[weight].shape
                    if shape is not None and (side, node.role, tuple(shape)) not in found:
                        found.append((side, node.role, tuple(shape)))
            elif node.role != "view":
                break
            node_id = node.through
    return tuple(found)


def _common_call(trace: Trace, call_ids: list[int]) -> int:
    chains = [trace.chain(c) for c in call_ids if c >= 0]
    if not chains:
        return -1
    common = -1
    for level in zip(*chains, strict=False):
        if len(set(level)) != 1:
            break
        common = level[0]
    return common


def _boundary(trace: Trace, root: int, lca: int) -> str:
    """Name the point where the skip leaves the stream: the input of the module call that holds both the skip
    and its branch, else the output of the outermost call inside it that produced x, else the op that made x."""
    if lca < 0:
        return "(model):in"
    call = trace.calls[lca]
    if not _same_value(trace, root).isdisjoint(call.inputs):  # the input itself, or the input reshaped
        return f"{call.path or '(model)'}:in"
    rows = {root} | {u for u in trace.users()[root] if trace.nodes[u].op in ops.ROW_OPS}  # a stack leaves in rows
    producers = [c for c in trace.calls if not rows.isdisjoint(c.outputs) and c.id != lca and trace.within(c.id, lca)]
    if producers:
        return f"{min(producers, key=lambda c: c.depth).path}:out"
    return f"{call.path or '(model)'}:{trace.nodes[root].op}"


def _wraps(trace: Trace, branch: set[int], add: Node, lca: int) -> tuple[str, ...]:
    """The learned modules on the branch, each named at the highest level that does not also hold the add:
    for Llama's `x + self_attn(input_layernorm(x))` that is (input_layernorm, self_attn)."""
    nodes, calls = trace.nodes, trace.calls
    holds_add = set(trace.chain(add.call))
    names: list[str] = []
    own: list[str] = []  # learned ops in the forward that performs the add (a stream read, a coefficient)
    for node_id in sorted(branch):
        node = nodes[node_id]
        if not node.uses_params or node.call < 0:
            continue
        chain = trace.chain(node.call)
        below = chain[chain.index(lca) + 1:] if lca in chain else chain
        pick = next((c for c in below if c not in holds_add), None)
        if pick is not None and calls[pick].path not in names:
            names.append(calls[pick].path)
        elif pick is None and node.role != "scale" and calls[node.call].path not in own:
            own.append(calls[node.call].path)
    return tuple(names or own)  # own ops name the wrap only when nothing else does: x + F.linear(x, self.w)


def _kind(trace: Trace, add: Node, branch_side: int, flags) -> str:
    flags = set(flags)
    flags |= _branch_tail(trace, branch_side)
    if add.scaled:
        flags.add("scaled")
    if add.op == "lerp":
        weight = add.operands[2] if len(add.operands) > 2 else -1
        flags.add("gated" if weight >= 0 and trace.nodes[weight].data else "scaled")
    if "mixed" in flags:
        return "multi-stream"
    if "projection" in flags:
        return "projection"
    if _normalized(trace, add):
        return "normalized"
    if "gated" in flags:
        return "gated"
    return "scaled" if "scaled" in flags else "identity"


def _branch_tail(trace: Trace, node_id: int) -> set[str]:
    """What happens to the branch's output on its way into the add: scaling, mixing, gating."""
    flags: set[str] = set()
    nodes = trace.nodes
    while node_id >= 0:
        node = nodes[node_id]
        if node.role == "scale" and not trace.in_norm(node):
            flags.add("scaled")
        elif node.role == "mix":
            flags.add("mixed")
        elif node.role == "gate":
            flags.add("gated")
            break
        elif node.role != "view":
            break
        node_id = node.through
    return flags


def _normalized(trace: Trace, add: Node) -> bool:
    """Post-LN: the sum is read only by a normalisation that runs inside the add's module (through views)."""
    nodes, users = trace.nodes, trace.users()
    frontier, seen_norm = [add.id], False
    while frontier:
        for user_id in users[frontier.pop()]:
            user = nodes[user_id]
            if trace.in_norm(user) and trace.within(user.call, add.call):
                seen_norm = True
            elif user.role == "view":
                frontier.append(user_id)
            else:
                return False
    return seen_norm
