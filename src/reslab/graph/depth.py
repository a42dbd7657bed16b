"""Connections across depth, read from the trace: skips that carry the stream over whole blocks, dense sums of
block outputs, and token-indexed tables added inside a block (docs/audit.md, "Connections across depth").

The blocks of a model (see `audit.py`) run one after another; between them lie *boundaries*. Boundary 0 is the
stream the first block receives (the embedding, x0), spelled `FIRST:in`; boundary k+1 is block k's output, spelled
`blocks.k:out`: a value made inside block k's call and handed out of it, made after the last learned op of block k
that leads to the add (a value that leaves a block early, value-residual's first-layer values, is no block output).
A residual (by the rules of `residuals.py`) whose skip is the stream at boundary b and whose branch holds a whole
block from b on that carries the stream (a block with residuals of its own, as a pre-LN block; a block that is
itself the branch, `x + layer(x)` added outside it, carries nothing) and has run before the add (which runs in a
later block, between blocks, or before the head) is a connection across depth, and its kind says which:

- `embedding re-injection`: the skip is boundary 0, the embedding (`x = x + c x0` at a later block);
- `backout`: the skip is subtracted after the last block (`x - lambda h_k` before the final norm);
- `long skip`: any other (U-net skips, a gated long skip `x + sigmoid(w) h_s`).

Two more rules see what the add rule cannot:

- `dense`: a sum, term by term, in which every term is weighted (a scalar, a per-channel factor or a
  data-dependent one) and two or more terms are the stream at distinct boundaries of one list of blocks
  (DenseFormer's `Y_i = sum_j alpha_ij X_j`, MUDD's `sum_j A_ij(x) X_j`). Each term but the newest (the current
  block's output, which the sum replaces) is reported, owned by the module whose forward sums them;
- `value embedding`: an add inside a block in which one operand, through views and factors, is a lookup of a
  parameter table by the model's token ids (modded-nanogpt's `v = l0 v + l1 ve[tokens]`); it is spelled
  `M:embedding`, M the module that owns the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from reslab.graph import ops
from reslab.graph.residuals import ACROSS_KINDS, Residual, _branch, _common_call, _same_value, _wraps, find_residuals
from reslab.graph.trace import Node, Trace


@dataclass(frozen=True)
class Chain:
    """One list of blocks, each run once, in execution order."""

    paths: tuple[str, ...]
    calls: tuple[int, ...]


def chains(trace: Trace, blocks: Sequence[str]) -> list[Chain]:
    """The blocks grouped by the list that holds them; a list with a block that ran more than once (weights shared
    across depth) has no boundaries to name, and is left out."""
    calls_of: dict[str, list[int]] = {}
    for call in trace.calls:
        calls_of.setdefault(call.path, []).append(call.id)
    lists: dict[str, list[str]] = {}
    for path in blocks:
        lists.setdefault(path.rpartition(".")[0], []).append(path)
    found = []
    for paths in lists.values():
        if all(len(calls_of.get(path, ())) == 1 for path in paths):
            ordered = sorted(paths, key=lambda p: calls_of[p][0])
            found.append(Chain(tuple(ordered), tuple(calls_of[p][0] for p in ordered)))
    return found


def boundary(trace: Trace, chain: Chain, node_id: int) -> tuple[int, str] | None:
    """(b, name) when `node_id` is the stream at boundary b of `chain`: an input of the next block to run, or an
    output of the block that made it; else None."""
    same = _same_value(trace, node_id)
    for k, call_id in enumerate(chain.calls):
        call = trace.calls[call_id]
        if node_id < call.start:
            return (k, f"{chain.paths[k]}:in") if not same.isdisjoint(call.inputs) else None
        if node_id < call.end:
            return (k + 1, f"{chain.paths[k]}:out") if node_id in call.outputs else None
    return None


def position(trace: Trace, chain: Chain, node_id: int) -> float:
    """Where an op ran along `chain`: k inside block k, k - 0.5 between blocks k-1 and k, L after the last."""
    for k, call_id in enumerate(chain.calls):
        call = trace.calls[call_id]
        if node_id < call.start:
            return k - 0.5
        if node_id < call.end:
            return float(k)
    return float(len(chain.calls))


def find_connections(trace: Trace, blocks: Sequence[str]) -> list[Residual]:
    """Every residual of the trace (`residuals.find_residuals`), connections across depth named and classified."""
    lists = chains(trace, blocks)
    dense, summed = dense_sums(trace, lists)
    embedded = [found for node in trace.nodes if node.op in ops.ADD_OPS and node.id not in summed
                for found in [value_embedding(trace, lists, node)] if found is not None]
    taken = frozenset(summed | {r.add for r in embedded})
    found = find_residuals(trace, taken)
    carrying = _carrying(trace, lists, found)
    ordinary = [across(trace, lists, carrying, r) for r in found]
    # a subtraction counts as a connection across depth only (backout); inside a block `a - b` is arithmetic
    # (RWKV's `k - max(k, m + w)`), never a residual
    ordinary = [r for r in ordinary if trace.nodes[r.add].op != "sub" or r.kind in ACROSS_KINDS]
    return sorted([*ordinary, *dense, *embedded], key=lambda r: r.add)  # stable: a sum's terms keep their order


def _carrying(trace: Trace, lists: list[Chain], found: list[Residual]) -> set[int]:
    """The calls of the blocks that carry the stream: blocks with residuals of their own (a pre-LN block). A block
    that is itself a branch (`x + layer(x)` added outside it, the book's MLP) carries nothing."""
    return {call_id for chain in lists for call_id in chain.calls
            if any(trace.calls[call_id].start <= r.add < trace.calls[call_id].end for r in found)}


def across(trace: Trace, lists: list[Chain], carrying: set[int], residual: Residual) -> Residual:
    """`residual` as a connection across depth when its skip is the stream at a boundary that it carries over at
    least one whole block carrying the stream; unchanged otherwise."""
    if residual.kind == "depth-attention" or residual.branch < 0:
        return residual
    for chain in lists:
        found = boundary(trace, chain, residual.skip)
        if found is None:
            continue
        b, name = found
        branch = _branch(trace, residual.skip, residual.branch) or set()
        over = [k for k in range(b, len(chain.calls)) if trace.calls[chain.calls[k]].end <= residual.add
                and chain.calls[k] in carrying and _learned_in(trace, chain.calls[k], branch)]
        if not over:
            return residual  # no whole block between: an ordinary residual (around its block, or inside it)
        if b > 0 and _learned_in(trace, chain.calls[b - 1], branch):
            return residual  # the value left block b-1 before that block's end: not its output
        where = position(trace, chain, residual.add)
        kind = "long skip"
        if b == 0:
            kind = "embedding re-injection"
        elif trace.nodes[residual.add].op == "sub" and where == len(chain.calls):
            kind = "backout"
        return replace(residual, skip_from=name, kind=kind)
    return residual


def _learned_in(trace: Trace, call_id: int, nodes) -> bool:
    return any(trace.nodes[i].uses_params and trace.within(trace.nodes[i].call, call_id) for i in nodes)


# --- dense sums -------------------------------------------------------------------------------------------------
def dense_sums(trace: Trace, lists: list[Chain]) -> tuple[list[Residual], set[int]]:
    """The residuals of every dense sum (see the module doc), and the ids of every add such a sum is made of."""
    found: list[Residual] = []
    summed: set[int] = set()
    for node in reversed(trace.nodes):  # the last add of a sum first: it takes the earlier ones with it
        if node.op not in ops.SUM_OPS or not node.data or node.id in summed:
            continue
        terms, adds = _terms(trace, node)
        residuals = _dense(trace, lists, node, terms)
        if residuals:
            found += residuals
            summed |= adds
    return found, summed


def _terms(trace: Trace, top: Node) -> tuple[list[tuple[tuple[int, ...], int, bool]], set[int]]:
    """The terms of the sum that ends at `top`, (the values the term may carry, the add it joins at, weighted?),
    and its adds. An add (or `addcmul`) in the same forward whose only reader is the next add is a step of the same
    sum; a product of two data values (a data-dependent weight and a source) may carry either."""
    nodes, users = trace.nodes, trace.users()
    terms: list[tuple[tuple[int, ...], int, bool]] = []
    adds: set[int] = set()
    stack = [top.id]
    while stack:
        add = nodes[stack.pop()]
        adds.add(add.id)
        parts = list(add.operands[:2])
        if add.op == "addcmul":  # input + t1 * t2: the product is a weighted term
            parts = add.inputs[:1] if len(add.inputs) >= 3 else []
            if parts:
                terms.append((tuple(_term_root(trace, f)[0] for f in add.inputs[1:3]), add.id, True))
        for part in parts:
            node = nodes[part] if part >= 0 else None
            if node is None:
                continue
            if node.op in ops.SUM_OPS and node.data and node.call == add.call and users[part] == [add.id]:
                stack.append(part)
            else:
                roots, weighted = _term_roots(trace, part)
                terms.append((roots, add.id, weighted))
    return terms, adds


def _term_roots(trace: Trace, node_id: int) -> tuple[tuple[int, ...], bool]:
    """The values a term may carry (both factors of a data-dependent product), and whether a factor weighs it."""
    root, weighted = _term_root(trace, node_id)
    node = trace.nodes[root]
    if node.role == "gate":
        return tuple(_term_root(trace, o)[0] for o in node.operands if o >= 0), True
    return (root,), weighted


def _term_root(trace: Trace, node_id: int) -> tuple[int, bool]:
    """The value a term carries, through views and scalings, and whether a scaling weighs it on the way."""
    nodes, weighted = trace.nodes, False
    while node_id >= 0 and nodes[node_id].role in ("view", "scale") and nodes[node_id].through >= 0:
        weighted = weighted or nodes[node_id].role == "scale"
        node_id = nodes[node_id].through
    return node_id, weighted


def _dense(trace: Trace, lists: list[Chain], top: Node, terms) -> list[Residual]:
    """The dense residuals of one sum: each term at an earlier boundary than the newest, when every term is
    weighted and two or more distinct boundaries of one chain are summed."""
    if len(terms) < 2 or not all(weighted for _, _, weighted in terms):
        return []
    for chain in lists:
        placed = []
        for roots, join, _ in terms:
            found = next(((b, root) for root in roots if root >= 0
                          for b in [boundary(trace, chain, root)] if b is not None), None)
            if found is not None:
                placed.append((found[0], found[1], join))
        if len({b for (b, _), _, _ in placed}) < 2:
            continue
        (newest, _), newest_root, _ = max(placed, key=lambda item: item[0][0])
        owner = trace.calls[top.call].path if top.call >= 0 else ""
        found = []
        for (b, name), root, join in placed:
            if b == newest:
                continue
            branch = _branch(trace, root, newest_root) or set()
            lca = _common_call(trace, [trace.nodes[i].call for i in branch] + [trace.nodes[join].call])
            found.append(Residual(owner, name, _wraps(trace, branch, trace.nodes[join], lca), "dense",
                                  add=join, skip=root, branch=newest_root))
        return found
    return []


# --- value embeddings ---------------------------------------------------------------------------------------------
def value_embedding(trace: Trace, lists: list[Chain], add: Node) -> Residual | None:
    """An add inside a block of a token-indexed table lookup (through views and factors) to another value."""
    if not add.data or len(add.operands) < 2 or add.call < 0:
        return None
    inside = [c.calls[int(p)] for c in lists for p in [position(trace, c, add.id)] if p.is_integer()
              and 0 <= p < len(c.calls)]
    if not inside:
        return None
    block = inside[0]
    a, b = add.operands[:2]
    for side, other in ((a, b), (b, a)):
        walked: list[int] = []
        lookup = _lookup(trace, side, walked)
        if lookup is None or other < 0 or not trace.nodes[other].data or _lookup(trace, other, []) is not None:
            continue
        if any((boundary(trace, c, node_id) or (-1,))[0] == 0 for c in lists for node_id in walked):
            return None  # the stream itself (a model whose embedding is its first block's input): the add rule's
        table = trace.nodes[lookup.inputs[1]].name.rpartition(".")[0]
        made = _ancestors_since(trace, other, trace.calls[block].start)
        return Residual(trace.calls[add.call].path, f"{table}:embedding", _wraps(trace, made, add, block),
                        "value embedding", add=add.id, skip=lookup.id, branch=other)
    return None


def _lookup(trace: Trace, node_id: int, walked: list[int]) -> Node | None:
    """The `embedding` op whose rows `node_id` carries (through views and factors), when it looks up a parameter
    table by a model input (the token ids); `walked` gets the values passed on the way."""
    nodes = trace.nodes
    while node_id >= 0 and len(walked) < 16:
        node = nodes[node_id]
        walked.append(node_id)
        if node.op == "embedding" and len(node.inputs) >= 2:
            ids, table = nodes[node.inputs[0]], nodes[node.inputs[1]]
            while ids.role == "view" and ids.through >= 0:
                ids = nodes[ids.through]
            return node if ids.op == "input" and table.op == "param" else None
        if node.role in ("view", "scale"):
            node_id = node.through
        elif node.role == "gate":
            found = [n for n in (_lookup(trace, o, walked) for o in node.operands if o >= 0) if n is not None]
            return found[0] if found else None
        else:
            return None
    return None


def _ancestors_since(trace: Trace, node_id: int, start: int) -> set[int]:
    """`node_id` and the data values it was computed from since node `start` (the block's own computation)."""
    found, stack = set(), [node_id]
    while stack:
        current = stack.pop()
        if current in found or current < start or not trace.nodes[current].data:
            continue
        found.add(current)
        stack.extend(trace.nodes[current].inputs)
    return found
