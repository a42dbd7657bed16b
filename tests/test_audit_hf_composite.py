"""`reslab audit hf:TYPE` on types whose small config needs more than the generic fields (issue 27 item 4).

- qwen4_exp is a composite config (text + vision): the small fields must land in its text_config, which its causal
  LM builds from; its 4-layer default has one `indexed_attention` layer (every 4th), whose QSA indexer needs its own
  fields. Each decoder layer has two gated hyper-connection residuals (modeling_qwen4_exp.py, the decoder layer's
  `h_k + b_k F(m)` update), which the audit reads as `gated`.
- gemma3n_text shares the KV of its last `num_kv_shared_layers` (15 by default) layers, which a 2-layer model cannot:
  the small config has none. Its residuals per layer are those tests/test_audit_zoo.py reads off modeling_gemma3n.py
  (AltUp predict, LAuReL, attention, feed-forward, AltUp correct [gated], per-layer input).
- deepseek_v4 builds from the generic fields; its hyper-connections read as `multi-stream`.
"""

import json
from collections import Counter

from reslab.cli import main


def audit_json(capsys, *args: str) -> dict:
    code = main(["audit", *args, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def found(report: dict) -> Counter:
    return Counter((r["owner"], r["kind"]) for r in report["residuals"])


def layers(prefix: str, n: int, *sites: tuple[str, str]) -> Counter:
    return Counter((f"{prefix}.{i}{'.' + owner if owner else ''}", kind) for i in range(n) for owner, kind in sites)


def test_qwen4_exp_builds_its_small_text_model_with_an_indexed_attention_layer(capsys):
    report = audit_json(capsys, "hf:qwen4_exp")
    assert report["model"] == "Qwen4ExpForCausalLM"
    assert report["blocks"] == [f"model.layers.{i}" for i in range(4)]
    assert found(report) == layers("model.layers", 4, ("", "gated"), ("", "gated"))
    wrapped = {name for r in report["residuals"] for name in r["wraps"]}
    assert "model.layers.3.self_attn" in wrapped  # the indexed_attention layer ran, with its hyper-connection
    assert {f"model.layers.{i}.linear_attn" for i in range(3)} <= wrapped
    assert {f"model.layers.{i}.attn_hyper_connection" for i in range(4)} <= wrapped
    assert report["dead"] == [] and report["not_run"] == []


def test_qwen4_exp_set_goes_into_the_text_config(capsys):
    """2 layers are both linear attention: on CPU that runs only without a KV cache on the text config."""
    report = audit_json(capsys, "hf:qwen4_exp", "--set", "num_hidden_layers=2")
    assert report["blocks"] == ["model.layers.0", "model.layers.1"]
    assert found(report) == layers("model.layers", 2, ("", "gated"), ("", "gated"))


def test_a_misspelt_field_of_a_composite_config_is_one_line(capsys):
    assert main(["audit", "hf:qwen4_exp", "--set", "num_hiden_layers=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no field 'num_hiden_layers'" in err


def test_gemma3n_text_reads_its_laurel_and_altup_residuals(capsys):
    report = audit_json(capsys, "hf:gemma3n_text")
    assert report["model"] == "Gemma3nForCausalLM"
    assert found(report) == layers("model.layers", 2, ("", "identity"), ("laurel", "identity"), ("", "identity"),
                                   ("", "identity"), ("", "gated"), ("", "identity"))
    assert report["dead"] == [] and report["not_run"] == []


def test_deepseek_v4_reads_its_hyper_connections_as_multi_stream(capsys):
    report = audit_json(capsys, "hf:deepseek_v4")
    assert report["model"] == "DeepseekV4ForCausalLM"
    assert found(report) == layers("model.layers", 2, ("", "multi-stream"), ("", "multi-stream"))
    wrapped = {name for r in report["residuals"] for name in r["wraps"]}
    assert {"model.layers.0.attn_hc", "model.layers.0.self_attn"} <= wrapped


def test_the_json_gives_the_shapes_of_the_mixing_weights(capsys):
    """Per token (batch 1, the audit's 8 positions): V4's H_res (hc_mult 4 x 4) on the skip and H_post (4 streams)
    on the branch; Qwen4-Exp's injection weights (4 streams); Gemma 3n's AltUp correction (its 2 streams)."""
    def mixing(report: dict) -> list:
        return [{(m["on"], m["role"], tuple(m["shape"])) for m in r.get("mixing", [])} for r in report["residuals"]]

    v4 = mixing(audit_json(capsys, "hf:deepseek_v4"))
    assert len(v4) == 4 and all({("skip", "mix", (1, 8, 4, 4)), ("branch", "gate", (1, 8, 4, 1))} <= m for m in v4)
    qwen = mixing(audit_json(capsys, "hf:qwen4_exp"))
    assert len(qwen) == 8 and all(("branch", "gate", (1, 8, 4, 1)) in m for m in qwen)
    gemma = [m for m in mixing(audit_json(capsys, "hf:gemma3n_text")) if m]
    assert len(gemma) == 2 and all(("branch", "gate", (2, 1, 8, 1)) in m for m in gemma)
