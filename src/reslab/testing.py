"""Helpers for a user's own tests.

`assert_residuals(model, example_inputs, expected)` fails a test when the residual structure of `model` differs
from `expected`, with the same readable diff as `reslab audit --expect FILE`:

    from reslab.testing import assert_residuals

    def test_block_keeps_its_skips():
        model = MyModel(config)
        assert_residuals(model, (torch.zeros(1, 16, dtype=torch.long),), "tests/golden/my_model.json")
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from reslab.graph.audit import Audit, audit
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


__all__ = ["assert_residuals"]
