"""Helpers for a user's own tests.

`assert_residuals(model, example_inputs, expected)` fails a test when the residual structure of `model` differs
from `expected`, with the same readable diff as `reslab audit --expect FILE`:

    from reslab.testing import assert_residuals

    def test_block_keeps_its_skips():
        model = MyModel(config)
        assert_residuals(model, (torch.zeros(1, 16, dtype=torch.long),), "tests/golden/my_model.json")

`assert_design(model, example_inputs, design)` fails it when the code differs from a design, the claims of
`reslab audit --design FILE` (docs/audit.md, "Design against code"):

    assert_design(model, inputs, {"residuals": [{"around": "blocks.*.attn"}, {"around": "blocks.*.ffn"}]})
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from reslab.graph.audit import Audit, audit
from reslab.graph.design import DesignCheck, check_design, load_design
from reslab.graph.expect import differences, load_expected


def assert_residuals(model: nn.Module, example_inputs: Any, expected: Any) -> Audit:
    """Audit `model` on `example_inputs` and compare with `expected`: a golden file written by
    `reslab audit --write-expect` (a path), an audit dict or any part of one (`{"residuals": [...], "dead": []}`),
    or a list of residual dicts. Returns the audit; raises AssertionError listing every difference."""
    result = audit(model, example_inputs)
    lines = differences(load_expected(expected), result.to_dict())
    if lines:
        raise AssertionError("residual structure differs from the expected one:\n" + "\n".join(lines))
    return result


def assert_design(model: nn.Module, example_inputs: Any, design: Any) -> DesignCheck:
    """Audit `model` on `example_inputs` and check `design` against it: a design file (a path) or a dict
    `{"residuals": [{"around": "layers.*.mlp"}, {"inside": "layers.*.attn", "kind": "scaled", "count": 1}]}`.
    Returns the check; raises AssertionError naming each claim the code lacks and each residual no claim covers."""
    design = load_design(design)  # a malformed design is the test's own error: ReslabError, before the trace
    check = check_design(audit(model, example_inputs), design)
    if not check.ok:
        raise AssertionError("the code differs from the design:\n" + check.format())
    return check


__all__ = ["assert_design", "assert_residuals"]
