"""The residual rules of issue 13, each on a minimal model that shows it (tests/fixtures/graph/rules.py): skip and
branch meet at their nearest common ancestor; `projection` only for an affine shortcut around a deeper branch;
summed parallel branches are one residual; per-channel factors on any axis; slices and chunks as views, scan
loops not; and tracing that copes with forwards the meta device cannot run. Then issue 23's forms a user writes:
one module under two paths, torchvision's ResNet blocks (in-place ReLU, `out += identity`), hyper-connections that
read and mix the streams in one einsum, a slice that keeps the whole, a callable's grouped-matmul MoE on meta."""

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


def test_a_skip_split_off_whole_is_the_stream():
    """`tensor_split(x, [n])` keeping all n steps is x itself (its sections are no index, so it is a slice, and a
    slice that keeps the whole is the value): the D skip reaches x, where the learned x_proj reads it."""
    assert residuals(toys.Wrapper(rules.SplitBeforeScan()), (toys.features(),)) == [
        {"owner": "body", "skip_from": "body:in", "wraps": ["body.x_proj"], "kind": "scaled"}]


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
@pytest.mark.parametrize("callable_, residuals_", [("grouped_matmul_moe_on_meta", 2), ("data_dependent_on_meta", 0),
                                                   ("transformers_moe_on_meta", 4)])
def test_callable_target_that_cannot_run_on_meta_is_traced_on_cpu_with_a_note(capsys, callable_, residuals_):
    """As hf: and built-in models are: a grouped matmul refuses meta's float32 (a dtype error that never says
    "meta"), a forward reads a value; the callable runs again with meta read as cpu, and a note says so."""
    if callable_.startswith("transformers"):
        pytest.importorskip("transformers")
    spec = f"{FIXTURES / 'rules.py'}:{callable_}"
    code = main(["audit", spec])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err.startswith(f"note: {spec} ") and "traced on cpu" in err and err.count("\n") == 1
    assert "traced on cpu" in out.splitlines()[0] and f"total: {residuals_} residual" in out


def test_callable_target_too_large_to_rebuild_fails_on_meta_with_the_hint(capsys):
    code = main(["audit", f"{FIXTURES / 'rules.py'}:too_large_for_cpu_on_meta"])
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


# --- issue 23: forms a user writes that the audit once misread ---------------------------------------------------
@pytest.mark.parametrize("order", ["list first", "wrappers first"])
def test_a_module_registered_under_two_paths_is_audited_under_the_first(order):
    """A model list and the residual wrappers that run its layers both hold each MLP (a KeyError once): the MLP is
    named by the path `named_modules` gives first, a child of that path's parent only; the wrappers are the
    blocks, the list's elements, which run only inside them, are not."""
    result = audit(rules.SharedLayers(order).eval(), (torch.randn(1, 3, 8),))
    mlp = "mlps.{}" if order == "list first" else "blocks.{}.ffn"
    assert [r.to_dict() for r in result.residuals] == [
        {"owner": f"blocks.{i}", "skip_from": f"blocks.{i}:in", "wraps": [f"blocks.{i}.norm", mlp.format(i)],
         "kind": "identity"} for i in range(2)]
    assert [b.path for b in result.blocks] == ["blocks.0", "blocks.1"]
    assert result.dead == [] and result.not_run == []
    assert "blocks.1: 1 residual — around" in result.format() and "<svg" in result.diagram().svg()


@pytest.mark.parametrize("block", [rules.BasicBlock, rules.Bottleneck], ids=["BasicBlock", "Bottleneck"])
@pytest.mark.parametrize("add", ["+=", "+"])
def test_torchvision_resnet_blocks_have_their_projection_shortcuts(block, add):
    """torchvision's blocks as torchvision writes them: `nn.ReLU(inplace=True)` runs `F.relu(x, inplace=True)`,
    which returns x itself; recorded as "x unchanged", it left the branch linear, so the conv + BN shortcut was
    no projection around a deeper branch. `out += identity` or `out = out + identity`: the same residuals."""
    result = audit(rules.ResNet(block, add).eval(), (torch.randn(1, 3, 8, 8),))
    first = "identity" if block is rules.BasicBlock else "projection"  # a Bottleneck's first block widens 4x
    assert [(r.owner, r.skip_from, r.kind) for r in result.residuals] == [
        ("layer1.0", "layer1.0:in", first), ("layer2.0", "layer2.0:in", "projection")]
    assert "layer2.0.downsample" not in result.residuals[1].wraps  # the shortcut is the skip, not the branch
    assert result.residuals[1].wraps[-2:] == (("layer2.0.conv2", "layer2.0.bn2") if block is rules.BasicBlock
                                              else ("layer2.0.conv3", "layer2.0.bn3"))


@pytest.mark.parametrize("expand", ["repeat", "einsum"])
def test_hyper_connections_that_mix_and_read_in_one_einsum_are_multi_stream(expand):
    """`[A_m | A_r]^T H` in one einsum (n streams in, n + 1 out), then sliced into the branch input and the mixed
    streams: the skip is a slice of a stream mix, so it passes through the mix, as `A_r^T H` alone does."""
    result = audit(rules.PackageStyleHyperConnections(expand).eval(), (toys.features(),))
    assert [r.to_dict() for r in result.residuals] == [  # the JSON gives the mix's shape: 3 streams in, 3 + 1 out
        {"owner": f"layers.{i}", "skip_from": f"layers.{i}:in", "wraps": [f"layers.{i}.branch"],
         "kind": "multi-stream", "mixing": [{"on": "skip", "role": "mix", "shape": [3, 4]}]} for i in range(2)]


def test_the_hyper_connections_package_is_multi_stream():
    """The `hyper-connections` package (lucidrains), dynamic weights and all: its norm of the streams feeds the
    branch's input weights, so the branch wraps it too."""
    import hyper_connections as package  # in the test extra
    init_hyper_connection, expand_streams, reduce_streams = package.get_init_and_expand_reduce_stream_functions(4)

    class Model(torch.nn.Module):
        def __init__(self, width: int = 8):
            super().__init__()
            self.embed, self.head = torch.nn.Linear(4, width), torch.nn.Linear(width, 2)
            self.layers = torch.nn.ModuleList(
                init_hyper_connection(dim=width, branch=rules.PreLNBranch(width), layer_index=i) for i in range(2))

        def forward(self, x):
            h = expand_streams(self.embed(x))
            for layer in self.layers:
                h = layer(h)
            return self.head(reduce_streams(h))

    # its dynamic [A_m | A_r] per token (batch 1, 3 positions), broadcast over its einsum: 4 streams in, 4 + 1 out
    mix = [{"on": "skip", "role": "mix", "shape": [1, 3, 1, 4, 1, 5]}]
    assert residuals(Model(), (toys.features(),)) == [
        {"owner": f"layers.{i}", "skip_from": f"layers.{i}:in", "wraps": [f"layers.{i}.norm", f"layers.{i}.branch"],
         "kind": "multi-stream", "mixing": mix} for i in range(2)]
