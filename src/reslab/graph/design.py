"""Design against code: where a design says residuals are, checked against where the traced code has them.

A *design* lists residual claims, each a module pattern with one relation:

- `{"around": M}`: a residual whose branch wraps module M (M is among the residual's `wraps`);
- `{"inside": M}`: a residual performed inside M or below (its add runs in M's forward or deeper);
- `{"from": S, "to": M}`: a connection whose skip leaves at S (the module part of its `skip_from`, and its boundary
  when S ends in one: `blocks.*:out`, `blocks.0:in`) and whose add runs inside M: a connection across depth
  (a long skip `{"from": "blocks.2:out", "to": "blocks.9"}`, the embedding re-injected into every block).

In a pattern, `*` stands for one whole path component (`layers.*.self_attn`). A claim holds for every module the
pattern matches: each needs at least one such residual, or exactly `count` of them when the claim gives a count;
`kind` narrows the residuals that count to one kind (see `residuals.KINDS`). A residual no claim covers is a
difference too, so a design pins the whole residual structure. A design may carry a free-text `note`.

This is what MiniMind did by hand after its diagram drew residuals its code lacked: dashed lines for what the
design has and the code lacks. `reslab audit --design`, `reslab diagram --design` and `reslab.testing.assert_design`
do it from the trace.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from reslab.errors import ReslabError
from reslab.graph.audit import Audit
from reslab.graph.paths import inside
from reslab.graph.residuals import ACROSS_KINDS, KINDS, Residual
from reslab.io import read_json_file, write_json

RELATIONS = ("around", "inside", "to")  # "to" comes with "from": a connection from a source into a module
CLAIM_KEYS = ("around", "inside", "from", "to", "kind", "count")
DESIGN_KEYS = ("residuals", "note")
FIX = "see docs/audit.md, 'Design against code'"


@dataclass(frozen=True)
class Claim:
    relation: str  # "around", "inside" or "to" (with `source`)
    pattern: str  # a module path; "*" stands for one component
    kind: str | None = None
    count: int | None = None  # per matched module; None: at least one
    source: str | None = None  # "to" claims: where the skip leaves, a module pattern with an optional ":boundary"

    def text(self) -> str:
        extra = [f"kind {self.kind}"] if self.kind else []
        extra += [f"count {self.count}"] if self.count is not None else []
        where = f"from {self.source} " if self.source is not None else ""
        return f"{where}{self.relation} {self.pattern or '(model)'}" + (f" ({', '.join(extra)})" if extra else "")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.source is None else {"from": self.source}
        out[self.relation] = self.pattern
        if self.kind:
            out["kind"] = self.kind
        if self.count is not None:
            out["count"] = self.count
        return out

    def modules(self, paths) -> list[str]:
        """The module paths this claim's pattern matches, in the model's order."""
        return [path for path in paths if matches(self.pattern, path)]

    def counts(self, residual: Residual, path: str) -> bool:
        """Does `residual` count for this claim at module `path`?"""
        if self.kind and residual.kind != self.kind:
            return False
        if self.source is not None and not from_matches(self.source, residual.skip_from):
            return False
        if self.relation == "around":
            return path in residual.wraps
        return inside(residual.owner, path)

    def covers(self, residual: Residual) -> bool:
        if self.kind and residual.kind != self.kind:
            return False
        if self.source is not None and not from_matches(self.source, residual.skip_from):
            return False
        if self.relation == "around":
            return any(matches(self.pattern, w) for w in residual.wraps)
        parts = residual.owner.split(".") if residual.owner else []
        return any(matches(self.pattern, ".".join(parts[:n])) for n in range(len(parts) + 1))


def matches(pattern: str, path: str) -> bool:
    """Does the module `path` fit `pattern`, `*` standing for one component?"""
    if not pattern or not path:
        return pattern == path
    want, got = pattern.split("."), path.split(".")
    return len(want) == len(got) and all(w in ("*", g) for w, g in zip(want, got, strict=True))


def from_matches(pattern: str, skip_from: str) -> bool:
    """Does a residual's `skip_from` ("blocks.2:out", "(model):in") fit a claim's `from` pattern ("blocks.*:out",
    "blocks.2": any boundary of blocks.2)?"""
    module, _, where = skip_from.rpartition(":")
    module = "" if module == "(model)" else module
    want, colon, boundary = pattern.partition(":")
    return matches(want, module) and (not colon or boundary == where)


@dataclass
class Design:
    claims: list[Claim]
    source: str = "the design"  # the file it came from, for messages
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"note": self.note} if self.note else {}
        out["residuals"] = [claim.to_dict() for claim in self.claims]
        return out


def load_design(design: Any) -> Design:
    """A design file (str or Path), a design dict (`{"residuals": [...]}`) or a `Design`; ReslabError, naming the
    problem and the fix, when it is malformed."""
    if isinstance(design, Design):
        return design
    if isinstance(design, (str, Path)):
        return parse_design(_read(Path(design)), str(design))
    if isinstance(design, Mapping):
        return parse_design(design, "the design")
    raise ReslabError(f"a design is a JSON file or a dict {{\"residuals\": [...]}}, got {type(design).__name__}")


def _read(path: Path) -> Any:
    """The design file's JSON: a missing file, a directory, bad JSON or JSON nested too deep is one error line."""
    return read_json_file(path, f"write one by hand ({FIX}) or with reslab audit TARGET --write-design {path}",
                          what="design file")


def _object(value: Any, where: str, keys: tuple[str, ...], example: str) -> Mapping:
    """`value` if it is a JSON object with only `keys`; else the error that says so."""
    if not isinstance(value, Mapping):
        raise ReslabError(f"{where} must be a JSON object like {example}, got {json.dumps(value)[:60]}")
    unknown = [key for key in value if key not in keys]
    if unknown:
        raise ReslabError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(keys)}")
    return value


def parse_design(data: Any, source: str) -> Design:
    _object(data, source, DESIGN_KEYS, '{"residuals": [...]}')
    claims = data.get("residuals")
    if not isinstance(claims, list):
        raise ReslabError(f"{source} needs \"residuals\": a list of claims like {{\"around\": \"layers.*.mlp\"}}")
    note = data.get("note", "")
    if not isinstance(note, str):
        raise ReslabError(f"{source}: 'note' must be a string")
    return Design([_claim(item, f"{source}, claim {i + 1}") for i, item in enumerate(claims)], source, note)


def _claim(item: Any, where: str) -> Claim:
    _object(item, where, CLAIM_KEYS, '{"around": "layers.*.mlp"}')
    relations = [key for key in RELATIONS if key in item]
    if len(relations) != 1 or ("from" in item) != ("to" in item):
        raise ReslabError(f"{where} needs exactly one of 'around' or 'inside' (a module path), or 'from' with 'to' "
                          "(a connection across depth)")
    pattern = _pattern(item[relations[0]], relations[0], where)
    source = None
    if "from" in item:
        source = item["from"]
        module, colon, boundary = source.partition(":") if isinstance(source, str) else ("", "", "")
        if not isinstance(source, str) or (colon and (not boundary or ":" in boundary)):
            raise ReslabError(f"{where}: 'from' takes a module path with an optional boundary, like "
                              f"\"blocks.*:out\" or \"blocks.0:in\"; got {source!r}")
        _pattern(module, "from", where)
    kind = item.get("kind")
    if kind is not None and kind not in KINDS:
        raise ReslabError(f"{where}: unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
    count = item.get("count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count <= 0):
        raise ReslabError(f"{where}: count must be a positive integer (residuals per matched module), got {count!r}")
    return Claim(relations[0], pattern, kind, count, source)


def _pattern(pattern: Any, key: str, where: str) -> str:
    """A module path pattern, each component a name or a whole `*`; else the one-line error."""
    if not isinstance(pattern, str) or any(("*" in part and part != "*") or not part for part in pattern.split(".")):
        raise ReslabError(f"{where}: {key!r} takes a module path like \"layers.*.mlp\", a '*' standing "
                          f"for one whole path component; got {pattern!r}")
    return pattern


@dataclass
class ClaimResult:
    claim: Claim
    found: dict[str, int]  # matched module path -> residuals that count for the claim there
    residuals: list[int]  # indices into the audit's residuals that count for the claim somewhere

    @property
    def lacking(self) -> list[str]:
        """The matched modules where the code does not do what the claim says."""
        want = self.claim.count
        return [path for path, n in self.found.items() if (n != want if want is not None else n == 0)]

    @property
    def implemented(self) -> bool:
        return bool(self.found) and not self.lacking

    def describe(self) -> str:
        modules = len(self.found)
        if not modules:
            return f"{self.claim.text()}: no module matches {self.claim.pattern!r} in the model"
        text = (f"{self.claim.text()}: {modules - len(self.lacking)} of {modules} module{'s' * (modules != 1)}, "
                f"{len(self.residuals)} residual{'s' * (len(self.residuals) != 1)}")
        if self.lacking and (self.lacking != list(self.found) or self.claim.count is not None):
            text += " — lacking in " + ", ".join(_shown(self.lacking, self.found))  # (how many each has)
            if self.claim.count is not None:
                text += f" (claimed {self.claim.count} each)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"claim": self.claim.to_dict(), "text": self.claim.text(), "implemented": self.implemented,
                "modules": len(self.found), "modules_implemented": len(self.found) - len(self.lacking),
                "residuals": len(self.residuals), "found": dict(self.found), "lacking": self.lacking}


def _shown(paths: list[str], found: dict[str, int], limit: int = 4) -> list[str]:
    shown = [f"{path} ({found[path]})" for path in paths[:limit]]
    return shown + ([f"{len(paths) - limit} more"] if len(paths) > limit else [])


@dataclass
class DesignCheck:
    """A design compared with an audit: each claim implemented or not, and the residuals no claim covers."""

    design: Design
    audit: Audit = field(repr=False)
    results: list[ClaimResult]
    unclaimed: list[int]  # indices into the audit's residuals

    @property
    def ok(self) -> bool:
        return all(r.implemented for r in self.results) and not self.unclaimed

    @property
    def missing(self) -> list[ClaimResult]:
        return [r for r in self.results if not r.implemented]

    def lines(self) -> list[str]:
        done = sum(r.implemented for r in self.results)
        out = [f"design {self.design.source} against {self.audit.target}: {done} of {len(self.results)} claims "
               f"implemented, {len(self.unclaimed)} unclaimed residual{'s' * (len(self.unclaimed) != 1)}"]
        out += [f"  {'implemented' if r.implemented else 'MISSING    '}  {r.describe()}" for r in self.results]
        out += [f"  UNCLAIMED    {_residual_text(self.audit.residuals[i])}" for i in self.unclaimed]
        out.append("design matches the code" if self.ok else "design and code differ")
        return out

    def format(self) -> str:
        return "\n".join(self.lines())

    __str__ = format

    def to_dict(self) -> dict[str, Any]:
        return {"design": self.design.source, "matches": self.ok,
                "claims": [r.to_dict() for r in self.results],
                "unclaimed": [self.audit.residuals[i].to_dict() for i in self.unclaimed]}


def _residual_text(residual: Residual) -> str:
    wraps = ", ".join(residual.wraps) or "nothing learned"
    return f"{residual.kind} residual around {wraps}, added in {residual.owner or '(model)'}"


def check_design(result: Audit, design: Any) -> DesignCheck:
    """Compare `design` (a file, a dict or a `Design`) with the residuals of an audit."""
    design = load_design(design)
    results = [_result(claim, result) for claim in design.claims]
    unclaimed = [i for i, r in enumerate(result.residuals) if not any(c.covers(r) for c in design.claims)]
    return DesignCheck(design, result, results, unclaimed)


def _result(claim: Claim, result: Audit) -> ClaimResult:
    found = {path: 0 for path in claim.modules(result.trace.modules)}
    counted: set[int] = set()
    for index, residual in enumerate(result.residuals):
        for path in found:
            if claim.counts(residual, path):
                found[path] += 1
                counted.add(index)
    return ClaimResult(claim, found, sorted(counted))


def design_from_audit(result: Audit) -> Design:
    """The design that matches the code: one claim per residual, around the largest module it wraps (inside the
    module that adds it when it wraps none; from its source to the module that adds it for a connection across
    depth), with its kind and count; layer indices become `*` when every module the generalised pattern matches has
    the same count."""
    claims: list[Claim] = []
    for relation, path, kind, source in dict.fromkeys(_anchor(result, r) for r in result.residuals):
        general = Claim(relation, _general(path), kind, source=None if source is None else _general(source))
        claim = _exact(general, result) or _exact(Claim(relation, path, kind, source=source), result)
        if claim is not None and claim not in claims:
            claims.append(claim)
    return Design(claims, note=f"written by reslab audit --write-design from {result.target}")


def _general(path: str) -> str:
    """`path` with each layer index a `*` (a boundary suffix kept: blocks.2:out -> blocks.*:out)."""
    module, colon, boundary = path.partition(":")
    return ".".join("*" if part.isdigit() else part for part in module.split(".")) + colon + boundary if module \
        else path


def _anchor(result: Audit, residual: Residual) -> tuple[str, str, str, str | None]:
    sizes = result.trace.modules
    if residual.kind in ACROSS_KINDS:  # a connection across depth: where it leaves and where it is added
        module, _, boundary = residual.skip_from.rpartition(":")
        return "to", residual.owner, residual.kind, f"{'' if module == '(model)' else module}:{boundary}"
    if not residual.wraps:
        return "inside", residual.owner, residual.kind, None
    largest = max(residual.wraps, key=lambda p: sizes[p].subtree_params if p in sizes else 0)
    return "around", largest, residual.kind, None


def _exact(claim: Claim, result: Audit) -> Claim | None:
    """`claim` with the count every module it matches has, or None when the counts differ or one is zero."""
    counts = set(_result(claim, result).found.values())
    if len(counts) != 1 or 0 in counts:
        return None
    return replace(claim, count=counts.pop())


def write_design(design: Design, path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ReslabError(f"{path} is a directory; --write-design takes a file name like design.json")
    write_json(path, design.to_dict())  # atomic: a full disk leaves the old design whole
    return path
