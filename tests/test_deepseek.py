"""The `deepseek` model: multi-head latent attention (shapes, causality, the exact special case where it is
multi-head attention), interleaved RoPE, the default size, exact resume through the CLI, and the audit."""

import json

import pytest
import torch

import reslab
from reslab.graph.audit import audit
from reslab.nn import CausalSelfAttention, RotaryEmbedding
from reslab.nn.mla import MultiHeadLatentAttention

TINY = {"layers": 2, "width": 32, "heads": 2, "context": 16, "vocab_size": 11}
FAST = ["--model", "deepseek", "--width", "32", "--heads", "2", "--context", "16", "--batch", "8",
        "--eval-batches", "2", "--no-progress"]


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_mla_shapes_and_no_rope_part(q_lora_rank):
    mla = MultiHeadLatentAttention(32, 4, q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                   v_head_dim=6)
    assert mla(torch.randn(3, 10, 32)).shape == (3, 10, 32)
    assert mla.kv_up.weight.shape == (4 * (8 + 6), 16) and mla.kv_down.weight.shape == (16 + 4, 32)
    assert mla.out.weight.shape == (32, 4 * 6) and mla.head_dim == (12 + 6) / 2
    no_rope = MultiHeadLatentAttention(32, 4, q_lora_rank, 16, 8, 0, 6)
    assert no_rope.rope is None and no_rope(torch.randn(2, 5, 32)).shape == (2, 5, 32)


def test_changing_a_future_token_leaves_past_logits_unchanged():
    torch.manual_seed(0)
    model = reslab.build_model("deepseek", **TINY).eval()
    x = torch.randint(0, 11, (2, 12))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 11
    a, b = model(x).logits, model(y).logits
    # not bit-exact: a token routed elsewhere regroups the experts' matmuls, which rounds differently
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_mla_is_multi_head_attention_when_its_latents_are_the_identity(q_lora_rank):
    """With no RoPE part, W_dkv = I (kv_lora_rank = width), W_dq = I (or no query bottleneck), RMSNorm gains 1 and
    eps 0, and inputs of unit RMS per token (what a pre-norm feeds a sublayer), the latents are the input itself:
    c_kv = RMSNorm(x I) = x, so [k_nope, v]_h = x W_ukv,h and q_h = x W_uq,h: MHA with W_k,h, W_v,h the rows of
    W_ukv per head, scale 1/sqrt(qk_nope_head_dim)."""
    torch.manual_seed(0)
    width, heads, dim = 16, 4, 4
    mha = CausalSelfAttention(width, heads, bias=False)
    mla = MultiHeadLatentAttention(width, heads, q_lora_rank, kv_lora_rank=width, qk_nope_head_dim=dim,
                                   qk_rope_head_dim=0, v_head_dim=dim, norm_eps=0.0)
    wq, wk, wv = mha.qkv.weight.split(width)
    with torch.no_grad():
        mla.kv_down.weight.copy_(torch.eye(width))
        mla.kv_up.weight.copy_(torch.cat([wk.view(heads, dim, width), wv.view(heads, dim, width)], 1).flatten(0, 1))
        (mla.q_up if q_lora_rank else mla.q).weight.copy_(wq)
        if q_lora_rank:
            mla.q_down.weight.copy_(torch.eye(width))
        mla.out.weight.copy_(mha.out.weight)
    x = torch.randn(2, 9, width)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(mla(x), mha(x))


def test_interleaved_rope_is_half_split_rope_of_the_deinterleaved_channels():
    x = torch.randn(2, 3, 7, 8)
    deinterleaved = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    torch.testing.assert_close(RotaryEmbedding(8, interleaved=True)(x), RotaryEmbedding(8)(deinterleaved),
                               rtol=0, atol=0)


def test_default_deepseek_size():
    model = reslab.build_model("deepseek")
    c = model.config
    assert (c.width, c.layers, c.moe_experts, c.moe_top_k, c.moe_shared, c.first_k_dense) == (128, 4, 8, 2, 1, 1)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(b.ffn.experts.gate_up.numel() + b.ffn.experts.down.numel() for b in model.blocks[1:])
    active = total - routed * (1 - 2 / 8)
    assert (total, active) == (987_904, 545_536)


def test_invalid_routing_is_one_line():
    with pytest.raises(reslab.ReslabError, match="moe_top_k 3 exceeds the experts of 1 groups"):
        reslab.build_model("deepseek", moe_experts=8, moe_top_k=3, expert_groups=4, top_groups=1)
    with pytest.raises(reslab.ReslabError, match="router scoring"):
        reslab.build_model("deepseek", router_scoring="tanh")


def test_stop_and_resume_ends_exactly_like_an_uninterrupted_run(cli, corpus, tmp_path):
    args = [*FAST, "--layers", "2", "--dropout", "0.1", "--data", corpus, "--steps", "30", "--log-interval", "5",
            "--eval-interval", "15", "--checkpoint-interval", "10"]
    code, whole, err = cli("train", *args, "--out", tmp_path / "whole")
    assert code == 0, err
    code, out, err = cli("train", *args, "--out", tmp_path / "split", "--stop-at", "17")
    assert code == 0 and "stopped at step 17" in out
    code, resumed, err = cli("train", "--resume", tmp_path / "split", "--no-progress")
    assert code == 0, err
    drop = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_second", "train_seconds")}  # noqa: E731
    read = lambda d: [drop(json.loads(l)) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731,E741
    records = read("whole")
    assert read("split") == records
    biases = [r["model_metrics"]["balance_bias"] for r in records if "model_metrics" in r]
    assert biases[-1] != biases[0] and "moe_balance" in records[-1]["aux_losses"]  # the bias moved and resumed


def test_audit_finds_two_residuals_per_block_and_no_dead_expert(cli):
    code, out, err = cli("audit", "deepseek", "--layers", "3", "--residual", "pre")
    assert code == 0, err
    assert "traced on cpu" in err  # routing reads values: the meta device cannot run it
    assert "total: 6 residuals (6 identity) in 3 of 3 blocks" in out
    assert "dead: none" in out and "not run: none" in out
    model = reslab.build_model("deepseek", layers=3).eval()
    inputs = (torch.zeros(1, 8, dtype=torch.long),)  # the audit's example input
    assert (model(*inputs).metrics["moe_load"] == 0).any()  # some experts got no token in this pass ...
    result = audit(model, inputs)
    assert result.dead == [] and result.not_run == []  # ... and are neither dead nor missing: stacked, all read
    assert [len(b.residuals) for b in result.blocks] == [2, 2, 2]


# --- Hugging Face parity ----------------------------------------------------------------------------------------
HF_TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
               qk_rope_head_dim=4, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
               n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
               max_position_embeddings=32, bos_token_id=None, eos_token_id=None)


def random_hf_deepseek(**changes):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(**{**HF_TINY, **changes})
    hf = transformers.DeepseekV3ForCausalLM(config).float().eval()
    with torch.no_grad():  # every weight and the balance biases at random, norm gains near 1
        for name, tensor in hf.state_dict().items():
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(0.2 * torch.randn(tensor.shape))
            elif tensor.is_floating_point() and "rotary" not in name:
                tensor.copy_(0.1 * torch.randn(tensor.shape) + (1.0 if tensor.ndim == 1 else 0.0))
    return hf


@pytest.mark.parametrize("changes", [{}, {"rope_interleave": False, "q_lora_rank": None, "n_group": 1,
                                          "topk_group": 1, "norm_topk_prob": False, "tie_word_embeddings": True}])
def test_hf_deepseek_v3_logits_match_to_1e5(changes):
    from reslab.interop import from_hf, to_hf_state_dict

    hf = random_hf_deepseek(**changes)
    ours = from_hf(hf)
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(idx).logits, ours(idx).logits
    assert expected.std() > 0.1 and ours.blocks[1].ffn.router.bias.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    back = to_hf_state_dict(ours)  # and the way back: the very same tensors under the same names
    assert set(back) == set(hf.state_dict()) and all(torch.equal(back[k], v) for k, v in hf.state_dict().items())


@pytest.mark.parametrize("changes, message", [
    ({"num_key_value_heads": 2}, "num_key_value_heads=2 differs"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                          "original_max_position_embeddings": 8}}, "RoPE scaling 'yarn' is not supported"),
])
def test_unsupported_hf_deepseek_fields_are_refused_in_one_line(changes, message):
    transformers = pytest.importorskip("transformers")
    from reslab.interop import config_from_hf

    with pytest.raises(reslab.ReslabError, match=message) as error:
        config_from_hf(transformers.DeepseekV3Config(**{**HF_TINY, **changes}))
    assert "\n" not in str(error.value)


def test_a_saved_hf_deepseek_v3_checkpoint_with_per_expert_files_loads(tmp_path):
    from safetensors.torch import load_file

    from reslab.interop import load_hf_checkpoint

    hf = random_hf_deepseek()
    hf.save_pretrained(tmp_path)
    stored = {k for f in tmp_path.glob("*.safetensors") for k in load_file(f)}
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in stored  # files hold one tensor per expert
    ours = load_hf_checkpoint(tmp_path)
    idx = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx).logits, hf(idx).logits, rtol=0, atol=1e-5)
