"""`deepseek-v4`: DeepSeek-V4 as transformers 5.25 builds it (sliding-window layers), checked against transformers'
own `DeepseekV4ForCausalLM` with random weights from a small config; its refusals; a Hugging Face folder through
the CLI; its mHC swapped for other schemes; DDP equal to one process and kill -9 resumes (the multi-stream default).
The reslab -> HF -> reslab round trip is in test_interop_adapters.py (its CASES)."""

from __future__ import annotations

import json

import pytest
import torch
from faults.helpers import RUN, metrics, reslab_process
from torchrun import TINY, assert_same_run, one_process_run, torchrun

import reslab
from reslab.errors import ReslabError
from reslab.interop import config_from_hf, from_hf
from reslab.interop.base import quiet_transformers

transformers = pytest.importorskip("transformers")

# three sliding-window layers (window 6 < the 20 tokens compared): one hash-routed, two top-k; 4 streams
HF_V4 = dict(vocab_size=97, hidden_size=48, moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=1, head_dim=16, q_lora_rank=24, n_routed_experts=4, num_experts_per_tok=2,
             n_shared_experts=1, max_position_embeddings=32, layer_types=["sliding_attention"] * 3,
             mlp_layer_types=["hash_moe", "moe", "moe"], hc_mult=4, hc_sinkhorn_iters=7, sliding_window=6,
             o_groups=2, o_lora_rank=8, partial_rotary_factor=0.5, swiglu_limit=0.3, bos_token_id=None,
             eos_token_id=None)
V4_FLAGS = ["--model", "deepseek-v4", "--width", "32", "--layers", "2", "--head-dim", "16", "--moe-experts", "4",
            "--window", "8"]


def random_hf_v4(**changes) -> torch.nn.Module:
    """transformers' V4 with every 1-D weight (norm gains, sinks, mHC biases and scales) and the routing tables
    drawn at random too, so that no part of the comparison rests on an init that hides it."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.DeepseekV4Config(**{**HF_V4, **changes}))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.3 * torch.randn_like(param))
        for layer in model.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "tid2eid"):
                gate.tid2eid.copy_(torch.randint(0, HF_V4["n_routed_experts"], gate.tid2eid.shape))
            else:
                gate.e_score_correction_bias.copy_(0.1 * torch.randn_like(gate.e_score_correction_bias))
    return model.eval()


def test_logits_equal_transformers_deepseek_v4():
    hf = random_hf_v4()
    ours = from_hf(hf)
    assert ours.config.residual == "mhc-v4" and ours.config.hash_layers == 1 and ours.config.window == 6
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(idx).logits, ours(idx).logits
    assert expected.std() > 0.1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("changes, field", [
    ({"layer_types": ["sliding_attention", "compressed_sparse_attention", "sliding_attention"]}, "layer_types"),
    ({"layer_types": ["heavily_compressed_attention"] * 3}, "layer_types"),
    ({"mlp_layer_types": ["moe", "hash_moe", "moe"]}, "mlp_layer_types"),
    ({"hc_eps": 1e-4}, "hc_eps"),
    ({"rope_parameters": {"main": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                   "original_max_position_embeddings": 8},
                          "compress": {"rope_type": "default", "rope_theta": 1e5}}}, "rope_parameters"),
])
def test_what_reslab_does_not_build_is_one_line_naming_the_field(changes, field):
    with pytest.raises(ReslabError, match=field) as caught:
        config_from_hf(transformers.DeepseekV4Config(**{**HF_V4, **changes}))
    assert "\n" not in str(caught.value)


def test_a_hugging_face_folder_is_read_by_the_cli_or_refused_in_one_line(cli, tmp_path):
    with quiet_transformers():  # no progress bar in the stderr checked below
        random_hf_v4().save_pretrained(tmp_path / "v4")
        random_hf_v4(layer_types=["sliding_attention", "compressed_sparse_attention", "sliding_attention"]
                     ).save_pretrained(tmp_path / "csa")
    code, out, err = cli("info", tmp_path / "v4")
    assert code == 0, err
    assert "DeepSeekV4Config" in out and '"mhc-v4"' in out and "sinkhorn_iters=7" in out
    # transformers writes V4's files under DeepSeek's own names (attn.wq_a, hc_attn_fn, ffn.experts.0.w1, ...)
    code, out, err = cli("lens", tmp_path / "v4", "--eval-tokens", "24", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["streams"]["count"] == 4 and record["layers"][-1]["kl"] == pytest.approx(0, abs=1e-6)
    code, out, err = cli("info", tmp_path / "csa")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "layer_types" in err, err


def test_the_window_bounds_what_a_query_sees():
    """One block: position 10 depends on tokens 10 - window + 1 .. 10 and on nothing earlier (the gradient of its
    logits with respect to the embeddings is zero there)."""
    torch.manual_seed(0)
    model = reslab.build_model("deepseek-v4", layers=1, width=32, heads=2, head_dim=16, window=4, vocab_size=11,
                               context=16, residual="pre")
    seen = []

    def keep(module, inputs, out):
        out.retain_grad()
        seen.append(out)

    model.tok_emb.register_forward_hook(keep)
    model(torch.randint(0, 11, (1, 16))).logits[0, 10].sum().backward()
    reach = seen[0].grad[0].abs().sum(-1)
    assert (reach[7:11] > 0).all() and (reach[:7] == 0).all() and (reach[11:] == 0).all()


@pytest.mark.parametrize("residual", ["pre", "post", "hc", "mhc", "gated-hc", "pre+x0+value-embed"])
def test_its_mhc_is_swapped_for_another_scheme_by_the_flag(cli, corpus, tmp_path, residual):
    code, out, err = cli("train", *V4_FLAGS, "--residual", residual, "--context", "16", "--batch", "4", "--steps",
                         "3", "--eval-batches", "1", "--data", corpus, "--out", tmp_path / "run", "--no-progress")
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"] == "deepseek-v4" and config["model_config"]["residual"] == residual


def test_two_processes_train_it_as_one_does(tmp_path):
    flags = [*V4_FLAGS]
    corpus, reference = one_process_run(tmp_path / "one", *flags)
    torchrun(*TINY, *flags, "--data", corpus, "--steps", "20", "--out", tmp_path / "two")
    assert_same_run(reference, tmp_path / "two")
    assert any("amax_gain_forward" in r for r in metrics(tmp_path / "two"))  # mHC's diagnostic, over both ranks


def test_killed_mid_step_it_resumes_to_the_uninterrupted_run(cli, corpus, tmp_path):
    args = [*RUN, *V4_FLAGS, "--data", corpus]
    code, _, err = cli("train", *args, "--out", tmp_path / "reference")
    assert code == 0, err
    killed = reslab_process(["train", *args, "--out", tmp_path / "run"], env={"RESLAB_FAILPOINTS": "step@13=kill"})
    assert killed.returncode == -9, killed.stderr
    code, _, err = cli("train", "--resume", tmp_path / "run", "--no-progress")
    assert code == 0, err
    assert metrics(tmp_path / "run") == metrics(tmp_path / "reference")


def test_the_lens_reads_every_stream_of_transformers_v4_and_its_collapse_is_the_models_own():
    """transformers' V4 read by the lens: four streams decoded apart; the collapse the lens reduces the streams with
    (the HyperHead, then the final norm) gives transformers' final hidden state, and the last entry its logits."""
    hf = random_hf_v4()
    ours = from_hf(hf)
    collapsed = []
    ours.norm.register_forward_hook(lambda module, inputs, out: collapsed.append(out.detach()))
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(2))
    result = reslab.lens(ours, ids, keep_logits=True)
    with torch.no_grad():
        expected = hf(ids, output_hidden_states=True)
    assert result.streams.count == 4 and len(result.streams.loss[0]) == len(result.names)
    assert result.streams.read is not None and all(0 < w < 1 for row in result.streams.read for w in row)
    torch.testing.assert_close(collapsed[0], expected.hidden_states[-1], rtol=0, atol=1e-5)
    torch.testing.assert_close(result.logits[-1], expected.logits[:, :-1], rtol=0, atol=1e-5)
    assert result.kl[-1] == pytest.approx(0, abs=1e-6) and result.top_1[-1] == 1


def test_the_cli_lens_on_hf_v4_decodes_each_stream(cli):
    code, out, err = cli("lens", "hf:deepseek_v4", "--set", 'layer_types=["sliding_attention","sliding_attention"]',
                         "--eval-tokens", "24", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["streams"]["count"] == 4 and len(record["streams"]["loss"]) == 4


@pytest.mark.parametrize("residual, kind", [("mhc-v4", "multi-stream"), ("pre", "identity")])
def test_the_audit_reads_the_scheme_it_was_built_with(cli, residual, kind):
    code, out, err = cli("audit", "deepseek-v4", "--layers", "2", "--residual", residual, "--json")
    assert code == 0, err
    record = json.loads(out)
    assert [r["kind"] for r in record["residuals"]] == [kind] * 4
    assert record["dead"] == [] and record["not_run"] == []
