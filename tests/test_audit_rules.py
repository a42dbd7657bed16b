"""The residual rules of issue 13, each on a minimal model that shows it (tests/fixtures/graph/rules.py): skip and
branch meet at their nearest common ancestor; `projection` only for an affine shortcut around a deeper branch;
summed parallel branches are one residual; per-channel factors on any axis; slices and chunks as views, scan
loops not; and tracing that copes with forwards the meta device cannot run."""

import sys
from pathlib import Path

import pytest
import torch

from reslab.cli import main
from reslab.graph import audit

FIXTURES = Path(__file__).parent / "fixtures" / "graph"
sys.path.insert(0, str(FIXTURES))
import rules  # noqa: E402
import toys  # noqa: E402


def residuals(model, inputs):
    return [r.to_dict() for r in audit(model.eval(), inputs).residuals]


def test_tanh_gelu_after_a_linear_is_no_residual():
    """`h + 0.044715 * h**3` reads the Linear's output on both sides: they meet at `h`, after the Linear, and the
    cube is not learned. The Linear cannot be both the skip's projection and the branch's learned op."""
    assert residuals(toys.Wrapper(rules.TanhGELUMLP()), (toys.features(),)) == []


def test_tanh_gelu_mlp_inside_a_residual_block_leaves_only_that_residual():
    assert residuals(toys.Wrapper(rules.PreLN(rules.TanhGELUMLP())), (toys.features(),)) == [
        {"owner": "body", "skip_from": "body:in", "wraps": ["body.norm", "body.ffn"], "kind": "identity"}]


@pytest.mark.parametrize("order", ["x+a+m", "a+m+x", "x+(a+m)"])
def test_parallel_attention_and_mlp_are_one_residual_whatever_the_order(order):
    found = residuals(toys.Wrapper(rules.ParallelBlock(order)), (toys.features(),))
    assert len(found) == 1, found
    (residual,) = found
    assert residual["owner"] == "body" and residual["skip_from"] == "body:in" and residual["kind"] == "identity"
    assert residual["wraps"][:2] == ["body.ln", "body.attn"]  # the add that brings x in holds at least attention
    if order != "x+a+m":  # x joins the sum of both branches
        assert residual["wraps"] == ["body.ln", "body.attn", "body.mlp"]


def test_routed_and_shared_experts_are_one_residual():
    model = toys.Wrapper(rules.MoEBlock())
    found = residuals(model, (torch.randn(1, 5, 4),))
    assert len(found) == 1, found
    assert found[0]["owner"] == "body" and found[0]["skip_from"] == "body:in" and found[0]["kind"] == "identity"
    assert "body.moe" in found[0]["wraps"]


def test_channels_first_per_channel_factors_are_scaled():
    (mamba,) = residuals(toys.Wrapper(rules.ChannelsFirstD()), (toys.features(),))
    assert mamba["kind"] == "scaled" and mamba["owner"] == "body" and mamba["wraps"] == ["body.conv"]
    (pool,) = residuals(rules.ChannelsFirstLayerScale(), (torch.randn(1, 8, 4, 4),))
    assert pool == {"owner": "", "skip_from": "(model):in", "wraps": ["norm", "mix"], "kind": "scaled"}


def test_chunked_reversible_skips_are_found():
    found = residuals(toys.Wrapper(rules.Reversible("chunk")), (toys.features(),))
    assert [(r["owner"], r["wraps"], r["kind"]) for r in found] == [
        ("body", ["body.f"], "identity"),  # Y1 = X1 + f(X2): X1 and X2 are chunks of the same cat([h, h])
        ("body", ["body.f", "body.g"], "identity"),  # Y2 = X2 + g(Y1)
    ]
    assert found[0]["skip_from"] == "body:cat"


@pytest.mark.parametrize("form", ["slice", "slice-write"])
def test_a_skip_that_is_a_slice_of_the_stream_is_found(form):
    found = residuals(toys.Wrapper(rules.Reversible(form)), (toys.features(),))
    assert [(r["owner"], r["skip_from"], r["wraps"], r["kind"]) for r in found] == [
        ("body", "body:in", ["body.f"], "identity")]


def test_a_recurrent_scan_is_not_a_chain_of_residuals():
    assert residuals(toys.Wrapper(rules.Scan()), (toys.features(length=5),)) == []


def test_affine_shortcuts_around_deeper_branches_are_projections():
    (linear,) = residuals(rules.LinearShortcut(), (torch.randn(1, 3, 8),))
    assert linear == {"owner": "", "skip_from": "(model):in", "wraps": ["fc1", "fc2"], "kind": "projection"}
    resnet = audit(toys.TinyResNet().eval(), (torch.zeros(1, 3, 8, 8),))
    assert [(r.owner, r.kind) for r in resnet.residuals] == [("layers.0", "identity"), ("layers.1", "projection")]


def test_a_gated_mlp_is_no_projection_shortcut():
    """`mlp(h) + attn(h)`: the MLP's `down(silu(gate(h)) * up(h))` is no affine map of h, so neither side is a
    skip of the other."""
    class TwoBranches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = rules.Attention(), rules.GatedMLP()

        def forward(self, h):
            return self.mlp(h) + self.attn(h)

    assert residuals(toys.Wrapper(TwoBranches()), (toys.features(),)) == []


# --- tracing models the meta device cannot run ------------------------------------------------------------------
def test_callable_target_on_meta_fails_with_the_hint(capsys):
    code = main(["audit", f"{FIXTURES / 'rules.py'}:data_dependent_on_meta"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "cannot read tensor values" in err and "on cpu" in err


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_hf_moe_targets_fall_back_to_cpu_with_a_note(capsys, model_type):
    pytest.importorskip("transformers")
    code = main(["audit", f"hf:{model_type}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"note: hf:{model_type} " in err and "traced on cpu" in err and len(err.strip().splitlines()) == 1
    assert "traced on cpu" in out.splitlines()[0] and "ForCausalLM" in out.splitlines()[0]
    assert "total: 4 residuals (4 identity) in 2 of 2 blocks" in out  # routed + shared experts: one per sublayer
