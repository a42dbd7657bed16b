"""`reslab audit` through the command line: targets, human and JSON output, golden files, errors."""

import json
from pathlib import Path

import pytest
import torch

import reslab
from reslab.cli import main
from reslab.graph.targets import parse_sets, parse_value
from reslab.testing import assert_residuals

FIXTURES = Path(__file__).parent / "fixtures" / "graph"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_human_audit_of_gpt_without_residuals(capsys):
    code, out, _ = run(capsys, "audit", "gpt", "--residual", "none")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "gpt (residual=none): GPT, 4 blocks, traced on the meta device (no weights)"
    assert lines[1] == "blocks.0: 0 residuals; none inside attn, none inside ffn"
    assert "total: 0 residuals in 0 of 4 blocks" in lines


def test_json_audit_has_the_documented_shape(capsys):
    code, out, _ = run(capsys, "audit", "llama", "--layers", "3", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["target"] == "llama (layers=3)"
    assert set(data) >= {"target", "residuals", "dead", "not_run", "modules", "summary"}
    assert all(set(r) == {"owner", "skip_from", "wraps", "kind"} for r in data["residuals"])
    assert data["summary"] == {"residual_count": 6, "blocks_with_residuals": 3, "blocks_without": 0}
    # every module holding a parameterised submodule, and only those
    assert set(data["modules"]) == {"", "blocks", "blocks.0", "blocks.1", "blocks.2", "blocks.0.attn",
                                    "blocks.1.attn", "blocks.2.attn", "blocks.0.ffn", "blocks.1.ffn", "blocks.2.ffn",
                                    "blocks.0.attn_residual", "blocks.0.ffn_residual", "blocks.1.attn_residual",
                                    "blocks.1.ffn_residual", "blocks.2.attn_residual", "blocks.2.ffn_residual"}
    assert data["modules"]["blocks.1"] == {"residuals_inside": 2}
    assert data["modules"]["blocks.1.attn_residual"] == {"residuals_inside": 1}


def test_cpu_device_gives_the_same_structure(capsys):
    _, meta, _ = run(capsys, "audit", "tiny", "--json")
    _, cpu, _ = run(capsys, "audit", "tiny", "--json", "--device", "cpu")
    assert json.loads(meta)["residuals"] == json.loads(cpu)["residuals"]


def test_hf_target_with_set(capsys):
    pytest.importorskip("transformers")
    code, out, _ = run(capsys, "audit", "hf:llama", "--set", "num_hidden_layers=3", "--set", "hidden_size=32")
    assert code == 0
    assert out.splitlines()[0].startswith("hf:llama (num_hidden_layers=3, hidden_size=32): LlamaForCausalLM, 3 blocks")


def test_run_directory_target(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(
        {"model": "gpt", "model_config": {"layers": 3, "width": 32, "heads": 2, "residual": "rezero"},
         "train": {"steps": 10}}))
    code, out, _ = run(capsys, "audit", run_dir, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["summary"]["residual_count"] == 6 and {r["kind"] for r in data["residuals"]} == {"scaled"}


def test_run_directory_without_config_is_a_one_line_error(tmp_path, capsys):
    code, out, err = run(capsys, "audit", tmp_path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "has no config.json" in err


def test_file_callable_target(capsys):
    code, out, _ = run(capsys, "audit", f"{FIXTURES / 'toys.py'}:highway", "--json")
    assert code == 0
    assert [r["kind"] for r in json.loads(out)["residuals"]] == ["gated"]


def test_module_callable_target_with_keyword_inputs(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    code, out, _ = run(capsys, "audit", "toys:ffn_residual", "--json")
    assert code == 0
    assert [r["owner"] for r in json.loads(out)["residuals"]] == ["blocks.0.ffn", "blocks.1.ffn"]


@pytest.mark.parametrize("argv, message", [
    (["audit", "nosuch"], "unknown target 'nosuch'"),
    (["audit", "hf:llama", "--layers", "3"], "--layers applies to built-in models only"),
    (["audit", "gpt", "--set", "depth=3"], "GPTConfig has no field 'depth'"),
    (["audit", "gpt", "--set", "layers"], "--set takes KEY=VALUE"),
    (["audit", "gpt", "--model", "llama"], "the TARGET names the model"),
    (["audit", "gpt", "--kv-heads", "2"], "--kv-heads does not apply to model 'gpt'"),
    (["audit", f"{FIXTURES / 'toys.py'}:not_a_pair"], "must return (model, example_inputs)"),
    (["audit", f"{FIXTURES / 'toys.py'}:nothing"], "has no callable 'nothing'"),
    (["audit", f"{FIXTURES / 'toys.py'}:highway", "--set", "a=1"], "--set and model flags do not apply"),
    (["audit", "gpt", "--expect", "/nonexistent/golden.json"], "no expected-audit file"),
])
def test_user_errors_are_one_line_and_exit_2(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("reslab: error: ") and message in err


def test_hf_config_errors_are_one_line(capsys):
    pytest.importorskip("transformers")
    code, _, err = run(capsys, "audit", "hf:nosuchmodel")
    assert code == 2 and "unknown transformers model type 'nosuchmodel'" in err
    code, _, err = run(capsys, "audit", "hf:llama", "--set", "hidden_size=30")
    assert code == 2 and err.count("\n") == 1
    assert "cannot build hf:llama from its config" in err and "hidden size (30)" in err


def test_forward_failure_names_the_module(capsys):
    code, _, err = run(capsys, "audit", f"{FIXTURES / 'toys.py'}:broken")
    assert code == 2 and err.count("\n") == 1
    assert "tracing" in err and "RuntimeError in body.up" in err


def test_meta_failure_suggests_cpu(capsys, monkeypatch):
    from reslab.graph import targets

    monkeypatch.syspath_prepend(str(FIXTURES))
    import toys

    def data_dependent_on_meta(spec, overrides=None, device="meta"):
        with torch.device(device):
            model = toys.DataDependent()
        return targets.Target(spec, model, (torch.ones(1, 4, device=device),))

    monkeypatch.setattr(targets, "load_target", data_dependent_on_meta)
    code, _, err = run(capsys, "audit", "gpt")
    assert code == 2 and "use --device cpu" in err


def test_golden_file_round_trip_and_readable_diff(tmp_path, capsys):
    golden = tmp_path / "gpt.json"
    code, _, _ = run(capsys, "audit", "gpt", "--layers", "2", "--write-expect", golden)
    assert code == 0 and json.loads(golden.read_text())["summary"]["residual_count"] == 4
    code, out, _ = run(capsys, "audit", "gpt", "--layers", "2", "--expect", golden)
    assert code == 0 and f"matches {golden}" in out
    code, out, _ = run(capsys, "audit", "gpt", "--layers", "2", "--residual", "none", "--expect", golden)
    assert code == 1
    assert f"residual structure differs from {golden}:" in out
    assert "residuals: 4 expected, 0 found" in out
    assert ("  - blocks.0.attn_residual: identity around blocks.0.attn_residual.norm, blocks.0.attn "
            "(skip from blocks.0.attn_residual:in)") in out
    code, out, _ = run(capsys, "audit", "gpt", "--layers", "2", "--residual", "rezero", "--expect", golden)
    assert code == 1
    assert ("  ~ blocks.0.attn_residual (skip from blocks.0.attn_residual:in): kind identity -> scaled; "
            "wraps ['blocks.0.attn_residual.norm', 'blocks.0.attn'] -> ['blocks.0.attn']") in out


def test_expect_with_json_keeps_stdout_json(tmp_path, capsys):
    golden = tmp_path / "tiny.json"
    run(capsys, "audit", "tiny", "--write-expect", golden)
    code, out, err = run(capsys, "audit", "tiny", "--residual", "article-edit", "--json", "--expect", golden)
    assert code == 1
    json.loads(out)
    assert "dead: + blocks.0.attn (found, not expected)" in err


@pytest.mark.parametrize("text, problem", [
    ('{"residuals": [1]}', "residuals[0] must be an object, got 1"),
    ('{"dead": "blocks.0"}', "dead must be a list"),
    ('{"residuals": [{"owner": "blocks.0", "kind": "skip"}]}', "residuals[0].kind must be one of"),
    ('{"residuals": [], "extra": []}', "unknown section 'extra'"),
])
def test_a_malformed_expected_audit_is_one_line_before_the_trace(tmp_path, capsys, text, problem):
    golden = tmp_path / "golden.json"
    golden.write_text(text)
    code, out, err = run(capsys, "audit", "tiny", "--expect", golden)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"{golden}" in err and problem in err and "--write-expect" in err


def test_assert_residuals_in_a_users_test(tmp_path, capsys):
    golden = tmp_path / "golden.json"
    run(capsys, "audit", "tiny", "--device", "cpu", "--write-expect", golden)
    model, inputs = reslab.build_model("tiny"), (torch.zeros(1, 8, dtype=torch.long),)
    result = assert_residuals(model, inputs, golden)
    assert len(result.residuals) == 2
    assert_residuals(model, inputs, {"dead": [], "not_run": []})
    with pytest.raises(AssertionError, match="dead: \\+ blocks.0.attn") as info:
        assert_residuals(reslab.build_model("tiny", residual="article-edit"), inputs, golden)
    assert "residuals: 2 expected, 0 found" in str(info.value)


def test_set_values_parse_as_json_or_python_literals():
    assert parse_value("4") == 4 and parse_value("1e-5") == 1e-5 and parse_value("true") is True
    assert parse_value("False") is False and parse_value("None") is None and parse_value("silu") == "silu"
    assert parse_sets(["a=1", "b = [1, 2]"]) == {"a": 1, "b": [1, 2]}
