"""The tracer: what it records, on which device, and that it follows the path a forward really takes."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import reslab
from reslab.graph import TraceError, trace_model

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "graph"))
import toys  # noqa: E402


def test_records_ops_with_the_module_call_that_ran_them():
    trace = trace_model(toys.Wrapper(toys.AddForm("plus")), (toys.features(),))
    by_path = {call.path: call for call in trace.calls}
    assert list(by_path) == ["", "inp", "body", "body.norm", "body.mlp", "body.mlp.up", "body.mlp.down", "out"]
    linear = [n for n in trace.nodes if n.op == "linear"]
    assert [trace.calls[n.call].path for n in linear] == ["inp", "body.mlp.up", "body.mlp.down", "out"]
    assert all(n.uses_params for n in linear)
    add = next(n for n in trace.nodes if n.op == "add")
    assert trace.calls[add.call].path == "body"
    assert trace.calls[by_path["body.mlp"].parent].path == "body"
    # the add reads the body's input and the MLP's output
    assert set(add.inputs) == set(by_path["body"].inputs) | set(by_path["body.mlp"].outputs)


def test_node_ids_are_a_topological_order():
    trace = trace_model(reslab.build_model("llama", layers=2), (toys.tokens(),))
    assert all(source < node.id for node in trace.nodes for source in node.inputs)


def test_in_place_add_gives_the_tensor_a_new_value():
    trace = trace_model(toys.Wrapper(toys.AddForm("iadd")), (toys.features(),))
    add = next(n for n in trace.nodes if n.op == "add")
    out = next(n for n in trace.nodes if n.op == "linear" and trace.calls[n.call].path == "out")
    assert add.id in out.inputs  # the output layer reads x after `x += fx`, not the clone before it


def test_meta_device_allocates_nothing_and_keeps_shapes():
    with torch.device("meta"):
        model = reslab.build_model("gpt", layers=2, width=64, heads=4)
    trace = trace_model(model, (torch.zeros(1, 8, dtype=torch.long, device="meta"),))
    assert trace.device == "meta"
    assert all(p.device.type == "meta" for p in model.parameters())
    (name, output), = trace.outputs
    assert trace.nodes[output].shape == (1, 8, 65)


def test_follows_the_data_dependent_branch_that_torch_fx_cannot_trace():
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(toys.DataDependent())
    positive = trace_model(toys.DataDependent(), (toys.features(),))
    negative = trace_model(toys.DataDependent(), (-toys.features(),))
    assert "ffn" in {c.path for c in positive.calls} and "alternative" not in {c.path for c in positive.calls}
    assert "alternative" in {c.path for c in negative.calls} and "ffn" not in {c.path for c in negative.calls}
    assert positive.control  # the `if` read a tensor's value


def test_model_is_left_as_it_was():
    model = toys.Wrapper(toys.AddForm("plus"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace_model(model, (toys.features(),))
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.is_grad_enabled()


def test_failure_names_the_module_that_was_running():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(TraceError, match="in inner") as info:
        trace_model(Broken(), (torch.ones(1, 5),))
    assert info.value.path == "inner"


def test_data_dependent_forward_on_meta_fails_clearly():
    with torch.device("meta"):
        model = toys.DataDependent()
    with pytest.raises(TraceError, match="meta"):
        trace_model(model, (torch.ones(1, 4, device="meta"),))
