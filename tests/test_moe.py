"""Mixture of experts (`reslab.nn.moe`, `llama --moe-experts`, `deepseek`): routing against brute force, the
balance loss against a hand computation, the auxiliary-loss-free bias, unrouted experts, Muon on expert stacks, and
every residual scheme on both MoE models."""

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

import reslab
from reslab.contracts import parameter_groups
from reslab.nn.moe import MoEFeedForward, Routing, StackedExperts, TopKRouter, balance_loss
from reslab.residual import SCHEMES
from reslab.train.muon import MuonAdamW, orthogonalize
from reslab.train.step import TrainStep

TINY = {"layers": 2, "width": 32, "heads": 2, "context": 16, "vocab_size": 11}


def brute_force_top_k(choice: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, the set of k experts with the largest scores, by trying every subset."""
    best = []
    for row in choice.tolist():
        subsets = itertools.combinations(range(len(row)), k)
        best.append(sorted(max(subsets, key=lambda s: sum(row[i] for i in s))))
    return torch.tensor(best)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_router_picks_the_top_k_and_gates_them_as_configured(scoring):
    torch.manual_seed(0)
    router = TopKRouter(6, 5, 2, scoring=scoring, normalize=scoring == "sigmoid", scale=2.5,
                        balance_bias=scoring == "sigmoid")
    if router.bias is not None:
        router.bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1, -0.4]))
    x = torch.randn(7, 6)
    routing = router(x)
    logits = x @ router.gate.weight.T
    scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
    choice = scores + (router.bias if router.bias is not None else 0)  # the bias only chooses
    assert torch.equal(routing.experts.sort(dim=-1).values, brute_force_top_k(choice, 2))
    chosen = scores.gather(1, routing.experts)
    expected = chosen / chosen.sum(-1, keepdim=True) if scoring == "sigmoid" else chosen
    torch.testing.assert_close(routing.gates, 2.5 * expected)


def test_group_limited_routing_only_uses_experts_of_the_best_groups():
    router = TopKRouter(4, 8, 2, scoring="sigmoid", groups=4, top_groups=1, balance_bias=True)
    x = torch.randn(20, 4)
    routing = router(x)
    scores = (x @ router.gate.weight.T).sigmoid().view(20, 4, 2)
    best_group = scores.topk(2, dim=-1).values.sum(-1).argmax(-1)  # two experts per group: both count
    assert torch.equal(routing.experts.sort(-1).values, torch.stack([2 * best_group, 2 * best_group + 1], -1))


def test_experts_compute_the_gated_sum_of_each_tokens_experts():
    torch.manual_seed(0)
    experts = StackedExperts(4, 6, 5, top_k=2)
    x = torch.randn(9, 6)
    chosen = torch.randint(0, 4, (9, 2))
    gates = torch.rand(9, 2)
    y = experts(x, Routing(torch.rand(9, 4), chosen, gates))
    for t in range(9):
        want = torch.zeros(6)
        for slot in range(2):
            e = chosen[t, slot]
            gate, up = (experts.gate_up[e] @ x[t]).chunk(2)
            want += gates[t, slot] * (experts.down[e] @ (F.silu(gate) * up))
        torch.testing.assert_close(y[t], want)


def test_experts_that_receive_no_token_still_get_a_gradient():
    """All tokens to one expert: the others run on empty slices, so DDP sees every expert weight used."""
    experts = StackedExperts(4, 6, 5, top_k=1)
    x = torch.randn(3, 6, requires_grad=True)
    y = experts(x, Routing(torch.rand(3, 4), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)))
    y.sum().backward()
    assert experts.gate_up.grad is not None and experts.down.grad is not None
    assert experts.gate_up.grad[0].abs().sum() > 0 and experts.gate_up.grad[1:].abs().sum() == 0


def test_balance_loss_matches_a_hand_computation():
    # 2 tokens, 3 experts, top-1: token 0 -> expert 0, token 1 -> expert 0.
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.7, 0.2, 0.1]])
    chosen = torch.tensor([[0], [0]])
    # f = (1, 0, 0); P = (0.6, 0.25, 0.15); E * sum f P = 3 * 0.6
    assert balance_loss(probs, chosen, 1).item() == pytest.approx(1.8)
    # per sequence (two sequences of one token): (3 * 0.5 + 3 * 0.7) / 2 = 1.8 too; now route token 1 elsewhere
    chosen = torch.tensor([[0], [2]])
    assert balance_loss(probs, chosen, 1).item() == pytest.approx(3 * (0.5 * 0.6 + 0.5 * 0.15))
    assert balance_loss(probs, chosen, 2).item() == pytest.approx((3 * 0.5 + 3 * 0.1) / 2)
    uniform = torch.full((4, 4), 0.25)
    assert balance_loss(uniform, torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]]), 1).item() == pytest.approx(1.0)


def skewed_moe(rate: float) -> MoEFeedForward:
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 1, scoring="sigmoid", balance_bias=True)
    with torch.no_grad():
        router.gate.weight.normal_(0, 0.1)
        router.gate.weight[0] += 1.0  # expert 0 wins almost every token
    return MoEFeedForward(8, 16, 4, 1, 0, router, per_sequence=True, balance_rate=rate)


def test_the_balance_bias_moves_the_load_toward_uniform():
    moe = skewed_moe(rate=0.05)
    x = torch.randn(4, 32, 8).abs()  # positive inputs: expert 0's logit is large
    loads = []
    for _ in range(40):
        moe(x)
        loads.append(moe.stats.load)
        moe.update_bias()
    assert loads[0][0] > 0.9  # skewed at first
    assert loads[-1].max() < 0.5 and (loads[-1] - 0.25).abs().sum() < (loads[0] - 0.25).abs().sum() / 2
    assert moe.router.bias[0] < 0 and (moe.router.bias[1:] > 0).all()


def test_the_bias_moves_once_per_optimizer_step_and_never_in_evaluation():
    model = reslab.build_model("deepseek", **TINY, balance_rate=0.01)
    moe = model.blocks[1].ffn
    x = torch.randint(0, 11, (4, 16))
    with torch.no_grad():
        model(x)  # an evaluation forward: no counts
    assert moe.counts is None
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), 0.0, torch.device("cpu"))
    step(x, x)
    assert moe.counts is None  # used and cleared by update_balance after the step
    assert torch.isin(moe.router.bias.abs(), torch.tensor([0.0, 0.01])).all() and moe.router.bias.abs().sum() > 0
    assert "router.bias" in dict(moe.named_buffers())  # in the checkpoint: resume continues from it


def test_muon_treats_each_stacked_expert_as_its_own_matrix():
    torch.manual_seed(0)
    model = reslab.build_model("llama", **TINY, moe_experts=3)
    experts = model.blocks[0].ffn.experts
    groups = parameter_groups(model)
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert id(experts.gate_up) in ids(groups.muon) and id(experts.gate_up) in ids(groups.decay)
    assert id(model.blocks[0].ffn.router.gate.weight) not in ids(groups.muon)  # the router: not_for_muon
    model(torch.randint(0, 11, (2, 16))).logits.sum().backward()
    before = experts.down.detach().clone()
    grad = experts.down.grad.clone()
    optimizer = MuonAdamW(model, lr=1e-3, muon_lr=0.02, weight_decay=0.0, betas=(0.9, 0.95), momentum=0.0,
                          ns_dtype=torch.float32)
    optimizer.step()
    scale = math.sqrt(max(1.0, before.shape[1] / before.shape[2]))
    for e in range(3):
        want = before[e] - 0.02 * scale * orthogonalize(grad[e], dtype=torch.float32)
        torch.testing.assert_close(experts.down[e], want)


def test_flops_count_the_active_experts_only():
    few = reslab.build_model("deepseek", **TINY, moe_experts=4)
    many = reslab.build_model("deepseek", **TINY, moe_experts=16)
    router_rows = (16 - 4) * 32  # the router scores every expert
    assert many.flops_per_token() - few.flops_per_token() == 6 * router_rows
    assert sum(p.numel() for p in many.parameters()) > sum(p.numel() for p in few.parameters()) + 12 * 3 * 64 * 32 - 1


@pytest.mark.parametrize("model,scheme", [(m, s) for m in ("deepseek", "deepseek-v4", "llama") for s in SCHEMES])
def test_every_residual_scheme_trains_on_the_moe_models(model, scheme):
    torch.manual_seed(0)
    extra = {"moe_experts": 4, "moe_shared": 1} if model == "llama" else {}
    net = reslab.build_model(model, residual=scheme, **TINY, **extra)
    step = TrainStep(net, torch.optim.AdamW(net.parameters(), lr=1e-3), 1.0, torch.device("cpu"),
                     aux_weights=net.aux_loss_weights)
    x, y = torch.randint(0, 11, (4, 16)), torch.randint(0, 11, (4, 16))
    results = [step(x, y, diagnostics=True) for _ in range(2)]
    assert all(math.isfinite(r.loss.item()) for r in results)
    assert all(math.isfinite(r.aux_losses["moe_balance"].item()) for r in results)
    assert results[1].metrics["moe_load"].sum(-1).allclose(torch.ones(len(results[1].metrics["moe_load"])))


def test_llama_moe_flags_train_and_log_load_entropy_and_aux_loss(cli, corpus, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", "--model", "llama", "--moe-experts", "4", "--moe-top-k", "2", "--moe-shared", "1",
                       "--moe-aux-weight", "0.05", "--layers", "2", "--width", "32", "--heads", "2", "--context",
                       "16", "--batch", "4", "--steps", "4", "--log-interval", "2", "--eval-batches", "1",
                       "--data", corpus, "--out", run, "--no-progress")
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["model_config"]["moe_experts"] == 4 and config["model_config"]["moe_aux_weight"] == 0.05
    logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "aux_losses" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for record in logged:
        load, entropy = record["model_metrics"]["moe_load"], record["model_metrics"]["router_entropy"]
        assert len(load) == 2 and all(sum(layer) == pytest.approx(1.0) for layer in load)
        assert all(0 < h <= math.log(4) + 1e-6 for h in entropy)
        assert 0 < record["aux_losses"]["moe_balance"] <= 2 * 4  # per layer E * sum_i f_i P_i <= E * max_i P_i


@pytest.mark.parametrize("flags", [["--moe-top-k", "5", "--moe-experts", "4"], ["--moe-experts", "-1"],
                                   ["--moe-aux-weight", "nan", "--moe-experts", "2"]])
def test_bad_moe_flags_are_one_line(cli, flags):
    code, _, err = cli("info", "--model", "llama", *flags)
    assert code == 2 and len(err.strip().splitlines()) == 1, err


def test_moe_models_need_no_find_unused_parameters_even_when_experts_get_no_token():
    from reslab.train.distributed import _has_unused_parameters

    for name, extra in (("deepseek", {}), ("llama", {"moe_experts": 8})):
        model = reslab.build_model(name, **TINY, **extra)  # one token, top-2 of 8: six experts unrouted
        assert not _has_unused_parameters(model, torch.device("cpu")) and model.training
        assert all(m.counts is None for m in model.modules() if isinstance(m, MoEFeedForward))


def test_two_processes_follow_one_process_balance_bias_included(cli, corpus, tmp_path):
    from torchrun import assert_same_run, metrics, one_thread, torchrun

    args = ["--model", "deepseek", "--layers", "2", "--width", "32", "--heads", "2", "--context", "16", "--batch",
            "8", "--eval-batches", "2", "--eval-interval", "10", "--log-interval", "1", "--no-progress",
            "--steps", "20", "--data", corpus, "--dtype", "fp32"]  # fp32: compared to 1e-5
    with one_thread():
        code, _, err = cli("train", *args, "--out", tmp_path / "one")
    assert code == 0, err
    torchrun(*args, "--out", tmp_path / "two")
    assert_same_run(tmp_path / "one", tmp_path / "two")  # loss, evaluations and checkpoint (the bias is in it)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["model_metrics"]["balance_bias"] for r in two] == [r["model_metrics"]["balance_bias"] for r in one]


# --- Hugging Face Mixtral and Qwen3-MoE as `llama --moe-experts` ------------------------------------------------
HF_MOE = {"mixtral": dict(num_local_experts=4), "qwen3_moe": dict(num_experts=4, moe_intermediate_size=40,
                                                                  norm_topk_prob=True, head_dim=16)}


def random_hf_moe(model_type: str, **changes):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    shape = dict(vocab_size=97, hidden_size=64, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=32, bos_token_id=None,
                 eos_token_id=None)
    config = transformers.AutoConfig.for_model(model_type, **{**shape, **HF_MOE[model_type], **changes})
    hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, tensor in hf.state_dict().items():
            if tensor.is_floating_point() and "rotary" not in name:
                tensor.copy_(0.1 * torch.randn(tensor.shape) + (1.0 if tensor.ndim == 1 else 0.0))
    return hf


@pytest.mark.parametrize("model_type", list(HF_MOE))
def test_hf_mixtral_and_qwen3_moe_load_as_llama_moe_from_models_and_saved_files(model_type, tmp_path):
    from safetensors.torch import load_file

    from reslab.interop import from_hf, load_hf_checkpoint

    hf = random_hf_moe(model_type)
    hf.save_pretrained(tmp_path)
    stored = {k for f in tmp_path.glob("*.safetensors") for k in load_file(f)}
    assert not any("gate_up_proj" in k for k in stored)  # files hold one tensor per expert
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        for ours in (from_hf(hf), load_hf_checkpoint(tmp_path)):
            assert ours.config.moe_experts == 4 and ours.config.qk_norm == (model_type == "qwen3_moe")
            torch.testing.assert_close(ours(idx).logits, expected, rtol=0, atol=1e-5)
    assert expected.std() > 0.1


@pytest.mark.parametrize("model_type, changes, message", [
    ("qwen3_moe", {"mlp_only_layers": [0]}, "mlp_only_layers=\\[0\\] is not supported"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step=2 is not supported"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1 is not supported"),
])
def test_unsupported_hf_moe_fields_are_refused_in_one_line(model_type, changes, message):
    transformers = pytest.importorskip("transformers")
    from reslab.interop import config_from_hf

    config = transformers.AutoConfig.for_model(model_type, **{**HF_MOE[model_type], **changes})
    with pytest.raises(reslab.ReslabError, match=message) as error:
        config_from_hf(config)
    assert "\n" not in str(error.value)


def test_gradient_accumulation_follows_one_batch_balance_bias_included(cli, corpus, tmp_path):
    """Expert counts add up over micro-batches; the bias moves once per optimizer step, as with one batch."""
    args = ["--model", "deepseek", "--layers", "2", "--width", "32", "--heads", "2", "--context", "16", "--batch",
            "8", "--eval-batches", "2", "--log-interval", "2", "--no-progress", "--steps", "8", "--data", corpus,
            "--dtype", "fp32"]  # fp32: compared to 1e-5
    runs = {}
    for accum in ("1", "4"):
        code, _, err = cli("train", *args, "--grad-accum", accum, "--out", tmp_path / accum)
        assert code == 0, err
        runs[accum] = [json.loads(line) for line in (tmp_path / accum / "metrics.jsonl").read_text().splitlines()]
    for one, four in zip(runs["1"], runs["4"], strict=True):
        assert four["loss"] == pytest.approx(one["loss"], abs=1e-5)
        assert four["model_metrics"]["balance_bias"] == one["model_metrics"]["balance_bias"]
