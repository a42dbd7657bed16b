"""Golden files: save an audit's residual structure, and say readably how a later audit differs from it.

The structure compared is what a refactor must not change by accident: the residuals (owner, skip_from, wraps,
kind), the dead modules and the modules that did not run. Counts, targets and the per-module table follow from
those and are not compared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reslab.errors import ReslabError
from reslab.graph.residuals import KINDS
from reslab.io import Field, check_schema, read_json_file, write_json

STRUCTURE = ("residuals", "dead", "not_run")
FIX = "write it with reslab audit TARGET --write-expect FILE"
_PATHS = Field(list, required=False, items=Field(str))
SCHEMA = {  # every section and every key of a residual is optional: a golden file may pin only part of an audit
    "residuals": Field(list, required=False, items={
        "owner": Field(str, required=False), "skip_from": Field(str, required=False),
        "wraps": _PATHS, "kind": Field(str, required=False, choices=KINDS)}),
    "dead": _PATHS,
    "not_run": _PATHS,
}


def load_expected(expected: Any) -> dict[str, Any]:
    """A golden file path, an audit dict (or any part of one), or a list of residual dicts; checked against
    `SCHEMA`, one error line naming the file and the key otherwise."""
    source = "the expected audit"
    if isinstance(expected, (str, Path)):
        source = str(expected)
        expected = read_json_file(expected, FIX, what="expected-audit file")
    if isinstance(expected, Sequence) and not isinstance(expected, str) and all(isinstance(r, Mapping)
                                                                                 for r in expected):
        expected = {"residuals": list(expected)}
    if not isinstance(expected, Mapping):
        raise ReslabError("an expected audit is a JSON object (as --write-expect writes) or a list of residual "
                          f"objects, not {type(expected).__name__} {str(expected)[:40]}")
    unknown = sorted(set(expected) - set(STRUCTURE) - {"target", "model", "modules", "blocks", "summary"})
    if unknown:
        raise ReslabError(f"{source} has unknown section {unknown[0]!r} (sections: {', '.join(STRUCTURE)}); {FIX}")
    check_schema(dict(expected), SCHEMA, source, FIX)
    return dict(expected)


def write_expected(audit_dict: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    write_json(path, dict(audit_dict))  # atomic: a full disk leaves the old file whole
    return path


def differences(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Readable lines, one per difference, in the sections `expected` has; empty when they agree."""
    lines: list[str] = []
    if "residuals" in expected:
        lines += _residual_differences(expected["residuals"], actual["residuals"])
    for key in STRUCTURE[1:]:
        if key in expected:
            want, got = set(expected[key]), set(actual[key])
            lines += [f"{key}: - {path} (expected, not found)" for path in sorted(want - got)]
            lines += [f"{key}: + {path} (found, not expected)" for path in sorted(got - want)]
    return lines


def describe(residual: Mapping[str, Any]) -> str:
    wraps = ", ".join(residual.get("wraps", [])) or "nothing"
    return (f"{residual.get('owner') or '(model)'}: {residual.get('kind')} around {wraps} "
            f"(skip from {residual.get('skip_from')})")


def _residual_differences(expected: list[Mapping], actual: list[Mapping]) -> list[str]:
    def key(r: Mapping) -> tuple[str, str]:
        return r.get("owner", ""), r.get("skip_from", "")

    lines = []
    if len(expected) != len(actual):
        lines.append(f"residuals: {len(expected)} expected, {len(actual)} found")
    remaining = list(actual)
    for want in expected:
        match = next((got for got in remaining if key(got) == key(want)), None)
        if match is None:
            lines.append(f"  - {describe(want)}")
            continue
        remaining.remove(match)
        changes = [f"{field} {want.get(field)} -> {match.get(field)}" for field in ("kind", "wraps")
                   if field in want and list_or(want[field]) != list_or(match.get(field))]
        if changes:
            lines.append(f"  ~ {want.get('owner') or '(model)'} (skip from {want.get('skip_from')}): "
                         + "; ".join(changes))
    lines += [f"  + {describe(got)}" for got in remaining]
    return lines


def list_or(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value
