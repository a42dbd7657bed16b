"""The residual definition on small hand-written models: every way to write the add, the adds that are not
residuals, each kind, residuals in unexpected places, dead and not-run modules."""

import sys
from pathlib import Path

import pytest
import torch

import reslab
from reslab.graph import audit

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "graph"))
import toys  # noqa: E402


@pytest.mark.parametrize("form, kind", [
    ("plus", "identity"), ("radd", "identity"), ("iadd", "identity"), ("torch.add", "identity"),
    ("add_", "identity"), ("dropout-view", "identity"), ("alpha", "scaled"), ("lerp", "scaled"),
])
def test_every_way_to_write_the_add(form, kind):
    result = audit(toys.Wrapper(toys.AddForm(form)), (toys.features(),))
    assert [r.to_dict() for r in result.residuals] == [
        {"owner": "body", "skip_from": "body:in", "wraps": ["body.norm", "body.mlp"], "kind": kind}]


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bias_position_mask_and_rope_adds_are_not_residuals(device):
    model = toys.NotResiduals().to(device)
    result = audit(model, (toys.tokens().to(device),))
    adds = [n for n in result.trace.nodes if n.op == "add"]
    assert len(adds) == 4  # token + position, bias, RoPE, mask: all recorded ...
    assert result.residuals == []  # ... none is a residual


def test_residual_inside_the_ffn_class_is_owned_by_the_ffn():
    model, inputs = toys.ffn_residual()
    result = audit(model, inputs)
    assert [r.owner for r in result.residuals] == ["blocks.0.ffn", "blocks.1.ffn"]
    assert result.residuals[0].wraps == ("blocks.0.ffn.up", "blocks.0.ffn.down")
    assert result.residuals[0].skip_from == "blocks.0.ffn:in"
    assert result.modules["blocks.0.ffn"] == 1 and result.modules["blocks.0"] == 1
    assert result.lines()[1] == "blocks.0: 1 residual — around ffn.up (+ffn.down) in ffn; 1 inside ffn"


def test_data_dependent_branch_reports_the_path_taken_and_what_did_not_run():
    taken = audit(toys.DataDependent(), (toys.features(),))
    assert [(r.owner, r.skip_from, r.wraps) for r in taken.residuals] == [("", "inp:out", ("ffn",))]
    assert taken.not_run == ["alternative"] and taken.dead == []
    other = audit(toys.DataDependent(), (-toys.features(),))
    assert other.residuals == [] and other.not_run == ["ffn"]


def test_unselected_experts_did_not_run_and_the_router_is_not_dead():
    result = audit(toys.Wrapper(toys.MoE()), (toys.features(),))
    assert result.not_run == ["body.experts.0", "body.experts.1", "body.experts.3"]
    assert result.dead == []  # the router's output only steers Python (`int(argmax)`), which is a use
    assert result.blocks == []  # experts of a mixture are not a stack of blocks
    assert [r.wraps for r in result.residuals] == [("body.experts.2",)]


def test_highway_skip_is_gated():
    model, inputs = toys.highway()
    (residual,) = audit(model, inputs).residuals
    assert residual.kind == "gated" and residual.skip_from == "body:in"
    assert residual.wraps == ("body.gate", "body.transform")


def test_resnet_downsampling_skip_is_a_projection():
    result = audit(toys.TinyResNet().eval(), (torch.zeros(1, 3, 8, 8),))
    assert [(r.owner, r.kind) for r in result.residuals] == [("layers.0", "identity"), ("layers.1", "projection")]
    assert "layers.1.downsample" not in result.residuals[1].wraps  # the projection is the skip, not the branch
    assert result.residuals[1].wraps == ("layers.1.conv1", "layers.1.bn1", "layers.1.conv2", "layers.1.bn2")


def test_hyper_connection_mix_is_multi_stream():
    result = audit(toys.MultiStream(), (toys.features(),))
    assert [(r.owner, r.kind, r.wraps) for r in result.residuals] == [
        ("blocks.0", "multi-stream", ("blocks.0.sublayer",)), ("blocks.1", "multi-stream", ("blocks.1.sublayer",))]


def test_scaling_x_by_a_learned_scalar_is_not_a_residual():
    class Rescale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x):
            return x + self.alpha * x

    assert audit(toys.Wrapper(Rescale()), (toys.features(),)).residuals == []


def test_two_linear_maps_added_are_not_a_projection_residual():
    class LoRA(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base, self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2), torch.nn.Linear(2, 8)

        def forward(self, x):
            return self.base(x) + self.b(self.a(x))

    assert audit(toys.Wrapper(LoRA()), (toys.features(),)).residuals == []


def test_dead_module_collapses_to_the_outermost_fully_dead_module():
    with torch.device("meta"):
        model = reslab.build_model("gpt", layers=3, residual="article-edit")
    result = audit(model, (torch.zeros(1, 8, dtype=torch.long, device="meta"),))
    assert result.dead == [f"blocks.{i}.{part}" for i in range(3) for part in ("attn", "ffn")]


def test_moderately_large_config_on_meta_allocates_no_weights():
    """About 1.2 B parameters (4.8 GB in fp32): audited on the meta device with almost no memory."""
    rss = Path("/proc/self/statm")
    if not rss.exists():
        pytest.skip("needs /proc to read the resident memory")
    page = 4096
    before = int(rss.read_text().split()[1]) * page
    with torch.device("meta"):
        model = reslab.build_model("llama", width=2048, layers=24, heads=16, kv_heads=4, vocab_size=32000)
    result = audit(model, (torch.zeros(1, 8, dtype=torch.long, device="meta"),))
    grown = int(rss.read_text().split()[1]) * page - before
    assert sum(p.numel() for p in model.parameters()) > 1.1e9
    assert len(result.residuals) == 48
    assert grown < 300 * 2**20, f"resident memory grew by {grown / 2**20:.0f} MiB"
