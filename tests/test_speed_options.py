"""Every speed option gives the same training as the plain path (within tolerance), and `reslab bench` reports."""

import json
import math

import pytest
import torch

import reslab
from reslab.train.config import TrainConfig
from reslab.train.muon import MuonAdamW, orthogonalize, orthogonalize_batch
from reslab.train.step import build_optimizer
from reslab.train.step import TrainStep, bf16_supported

CPU = torch.device("cpu")


def losses(steps=8, *, dtype="fp32", compile=False, optimizer="adamw", diagnostics=False, fused=True, seed=0,
           micro_batches=1, model="gpt"):
    torch.manual_seed(seed)
    net = reslab.build_model(model, layers=2, width=32, heads=2, context=16, vocab_size=20)
    config = TrainConfig(optimizer=optimizer, dtype=dtype, lr=3e-3)
    opt = build_optimizer(config, net, CPU)
    if not fused:
        opt = torch.optim.AdamW(opt.param_groups, lr=3e-3, betas=(0.9, 0.99), foreach=False, fused=False)
    step = TrainStep(net, opt, 1.0, CPU, dtype, compile, micro_batches=micro_batches)
    starts = torch.randint(0, 20, (steps, 8, 1), generator=torch.Generator().manual_seed(1))
    data = (starts + torch.arange(17)) % 20  # counting sequences: learnable, so losses fall
    return [step(d[:, :-1], d[:, 1:], diagnostics=diagnostics).loss.item() for d in data]


def test_fused_adamw_matches_the_plain_loop():
    assert losses(fused=True) == pytest.approx(losses(fused=False), abs=1e-5)


def test_diagnostics_do_not_change_training():
    assert losses(diagnostics=True) == pytest.approx(losses(diagnostics=False), abs=1e-6)


def test_micro_batches_match_one_batch():
    assert losses(micro_batches=2) == pytest.approx(losses(micro_batches=1), abs=1e-5)


@pytest.mark.skipif(not bf16_supported(CPU), reason="this CPU has no native bf16 (AVX512-BF16/AMX)")
def test_bf16_autocast_tracks_fp32():
    fp32, bf16 = losses(steps=12), losses(steps=12, dtype="bf16")
    assert bf16 == pytest.approx(fp32, abs=0.05)
    assert bf16[-1] < bf16[0] - 0.2


def test_bf16_attention_on_cpu_runs_in_fp32():
    """Under bf16 autocast the CPU attention is computed in fp32 (its bf16 backward is slow) and returns bf16."""
    from reslab.nn import CausalSelfAttention

    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, bias=False)
    q, k, v = (torch.randn(2, 4, 8, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attn.attend(q, k, v)
    assert y.dtype == torch.bfloat16
    exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(y.float(), exact.to(torch.bfloat16).float())
    y.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()


def test_bf16_refused_where_unsupported(monkeypatch):
    monkeypatch.setattr("reslab.train.step.bf16_supported", lambda device: False)
    with pytest.raises(reslab.ReslabError, match="--dtype bf16 needs native bf16"):
        losses(steps=1, dtype="bf16")


def test_compile_matches_eager():
    eager, compiled = losses(steps=4, model="tiny"), losses(steps=4, model="tiny", compile=True)
    assert compiled == pytest.approx(eager, abs=1e-4)


def test_compile_failure_falls_back_to_eager(monkeypatch, capsys):
    from rich.console import Console

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler on this machine")

    monkeypatch.setattr(torch, "compile", lambda model: broken)
    net = reslab.build_model("tiny", width=16, heads=2, context=8, vocab_size=10)
    step = TrainStep(net, torch.optim.SGD(net.parameters(), lr=0.1), 0.0, CPU, compile=True,
                     console=Console(file=None, stderr=True))
    data = torch.randint(0, 10, (2, 9))
    result = step(data[:, :-1], data[:, 1:])
    assert torch.isfinite(result.loss) and not step.compiled
    assert "torch.compile failed (RuntimeError: no compiler on this machine); running eager" in capsys.readouterr().err


def test_orthogonalize_flattens_singular_values():
    torch.manual_seed(0)
    for shape in [(32, 32), (96, 32), (32, 96)]:
        update = torch.randn(*shape)
        before = torch.linalg.svdvals(update)
        after = torch.linalg.svdvals(orthogonalize(update))
        assert after.max() < 1.25 and after.min() > 0.5, shape  # Muon's quintic: roughly 0.7 .. 1.2, not exactly 1
        assert after.max() / after.min() < (before.max() / before.min()) / 1.5


def test_orthogonalize_batch_matches_one_at_a_time_and_bf16_is_close():
    torch.manual_seed(0)
    stack = torch.randn(3, 48, 16)
    batched = orthogonalize_batch(stack)
    for i in range(3):
        torch.testing.assert_close(batched[i], orthogonalize(stack[i]), atol=1e-5, rtol=1e-4)
    low = orthogonalize_batch(stack, dtype=torch.bfloat16)
    assert low.dtype == torch.float32  # returned in the update's dtype
    values = torch.linalg.svdvals(low)
    assert values.max() < 1.25 and values.min() > 0.5
    assert (low - batched).abs().max() < 0.05


def test_muon_step_by_hand():
    """One step on one matrix: Nesterov momentum, Newton-Schulz, sqrt(rows/cols) scale, decoupled weight decay."""
    torch.manual_seed(0)
    net = reslab.build_model("gpt", layers=1, width=16, heads=2, context=8, vocab_size=11)
    optimizer = MuonAdamW(net, lr=1e-3, muon_lr=0.05, weight_decay=0.1, betas=(0.9, 0.99), ns_dtype=torch.float32)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    weight = net.blocks[0].attn.qkv.weight  # 48 x 16: tall
    before, grad = weight.detach().clone(), weight.grad.clone()
    optimizer.step()
    buffer = 0.05 * grad  # lerp from a zero buffer by 1 - momentum
    update = orthogonalize(grad.lerp(buffer, 0.95))
    expected = before * (1 - 0.05 * 0.1) - 0.05 * math.sqrt(48 / 16) * update
    torch.testing.assert_close(weight.detach(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("native, expected", [(False, torch.float32), (True, torch.bfloat16)])
def test_muon_orthogonalises_in_bf16_only_where_native(monkeypatch, native, expected):
    monkeypatch.setattr("reslab.train.muon.bf16_supported", lambda device: native)
    net = reslab.build_model("gpt", layers=1, width=16, heads=2, context=8, vocab_size=11)
    optimizer = MuonAdamW(net, lr=1e-3, muon_lr=0.05, weight_decay=0.1, betas=(0.9, 0.99))
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert optimizer.ns_dtype == expected


def test_muon_trains_and_splits_parameters():
    net = reslab.build_model("gpt", layers=2, width=32, heads=2, context=16, vocab_size=20)
    optimizer = MuonAdamW(net, lr=1e-3, muon_lr=0.02, weight_decay=0.1, betas=(0.9, 0.99))
    kinds = {group["kind"]: len(group["params"]) for group in optimizer.param_groups}
    assert kinds["muon"] == 2 * 4  # qkv, out, up, down per block
    curve = losses(steps=15, optimizer="muon")
    assert curve[-1] < curve[0] - 0.3


def test_muon_run_resumes_exactly(cli, corpus, tmp_path):
    args = ["train", "--model", "gpt", "--layers", "1", "--width", "32", "--heads", "2", "--context", "16",
            "--batch", "4", "--steps", "12", "--eval-batches", "2", "--log-interval", "4", "--optimizer", "muon",
            "--data", corpus, "--no-progress"]
    code, whole, err = cli(*args, "--out", tmp_path / "a")
    assert code == 0, err
    assert cli(*args, "--out", tmp_path / "b", "--stop-at", "5")[0] == 0
    code, resumed, err = cli("train", "--resume", tmp_path / "b", "--no-progress")
    assert code == 0, err
    read = lambda d: json.loads((tmp_path / d / "summary.json").read_text())["final_val_loss"]  # noqa: E731
    assert read("a") == read("b")


def test_flops_formula_by_hand():
    net = reslab.build_model("gpt", layers=2, width=32, heads=4, context=16, vocab_size=20, bias=False)
    per_block = 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32  # qkv, out, up, down
    matmul = 2 * per_block + 32 * 20  # + LM head (tied, still a matmul)
    assert net.flops_per_token() == 6 * matmul + 2 * 12 * 32 * 16


def test_bench_reports(cli):
    code, out, err = cli("bench", "--layers", "1", "--width", "32", "--heads", "2", "--context", "16", "--batch", "4",
                         "--warmup", "2", "--iters", "3", "--windows", "2", "--log-interval", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert len(result["ms_per_iter_windows"]) == 2 and result["ms_per_iter"] > 0
    assert result["tokens_per_second"] == pytest.approx(4 * 16 / (result["ms_per_iter"] / 1000))
    assert result["peak_gflops"] > 0 and 0 < result["fraction_of_peak"]
    from reslab.train.step import resolve_dtype

    assert result["dtype"] == resolve_dtype("auto", torch.device("cpu"))  # the default resolves, as in training
    code, out, _ = cli("bench", "--layers", "1", "--width", "32", "--heads", "2", "--context", "16", "--batch", "4",
                       "--warmup", "1", "--iters", "2", "--windows", "1")
    assert code == 0 and "ms/iter" in out and "% of peak" in out
    assert cli("bench", "--batch", "0")[0] == 2
