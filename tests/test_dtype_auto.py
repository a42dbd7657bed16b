"""`--dtype auto`, the default: bf16 autocast where the hardware runs bf16 natively, fp32 elsewhere; recorded in the
run's config.json, printed once at start, and kept when a run is resumed."""

import json

import pytest
import torch

from reslab.train.step import TrainStep

TINY = ["--model", "tiny", "--width", "16", "--heads", "2", "--context", "8", "--batch", "4", "--eval-batches", "1",
        "--eval-interval", "4", "--log-interval", "2"]


def torch_says_native_bf16() -> bool:
    """torch's own cpuinfo-based checks (the code under test reads /proc/cpuinfo instead)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def train_config(run) -> dict:
    return json.loads((run / "config.json").read_text())["train"]


def test_auto_is_the_default_and_records_what_this_cpu_runs(cli, corpus, tmp_path):
    code, _, err = cli("train", *TINY, "--data", corpus, "--steps", "4", "--out", tmp_path / "run")
    assert code == 0, err
    expected = "bf16" if torch_says_native_bf16() else "fp32"
    assert train_config(tmp_path / "run")["dtype"] == expected
    assert train_config(tmp_path / "run")["dtype_auto"] is True
    lines = [line for line in err.splitlines() if line.startswith("dtype:")]
    assert len(lines) == 1 and expected in lines[0] and "--dtype auto" in lines[0], err


def test_auto_is_fp32_without_native_bf16(cli, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr("reslab.train.step.cpu_flags", lambda: {"avx512f", "avx512bw", "avx2"})  # AVX512, no BF16
    code, _, err = cli("train", *TINY, "--data", corpus, "--steps", "2", "--out", tmp_path / "run")
    assert code == 0, err
    assert train_config(tmp_path / "run")["dtype"] == "fp32"
    assert "no native bf16 on cpu" in err


def test_explicit_fp32_is_exact_and_not_from_auto(cli, corpus, tmp_path):
    code, _, err = cli("train", *TINY, "--data", corpus, "--steps", "2", "--dtype", "fp32", "--no-progress",
                       "--out", tmp_path / "run")
    assert code == 0, err
    assert train_config(tmp_path / "run")["dtype"] == "fp32" and not train_config(tmp_path / "run")["dtype_auto"]
    assert "dtype:" not in err  # --no-progress: no notes


@pytest.mark.parametrize("recorded", ["fp32", "bf16"])
def test_a_resumed_run_keeps_its_recorded_dtype(cli, corpus, tmp_path, recorded):
    if recorded == "bf16" and not torch_says_native_bf16():
        pytest.skip("this CPU has no native bf16")
    run = tmp_path / "run"
    code, _, err = cli("train", *TINY, "--data", corpus, "--steps", "8", "--stop-at", "4", "--dtype", recorded,
                       "--out", run)
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    del config["train"]["dtype_auto"]  # as written before --dtype auto existed
    (run / "config.json").write_text(json.dumps(config))
    code, _, err = cli("train", "--resume", run, "--dtype", "auto")  # auto on resume: the run's own dtype
    assert code == 0, err
    assert train_config(run)["dtype"] == recorded
    assert f"dtype: {recorded}" in err and "as the run recorded" in err
    code, _, err = cli("train", "--resume", run, "--steps", "10", "--dtype", "fp32" if recorded == "bf16" else "bf16")
    assert code == 2 and "differs from the run's" in err


def test_unknown_dtype_is_one_line(cli, corpus, tmp_path):
    code, _, err = cli("train", *TINY, "--data", corpus, "--dtype", "fp16", "--out", tmp_path / "run")
    assert code == 2 and err.strip() == "reslab: error: unknown dtype 'fp16'; choose one of: auto, bf16, fp32"
    assert not (tmp_path / "run").exists()


def test_train_step_resolves_auto():
    net = torch.nn.Linear(2, 2)
    step = TrainStep(net, torch.optim.SGD(net.parameters(), lr=0.1), 0.0, torch.device("cpu"), dtype="auto")
    assert step.dtype == ("bf16" if torch_says_native_bf16() else "fp32")


@pytest.mark.parametrize("capability, native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_auto_on_cuda_counts_only_native_bf16(monkeypatch, capability, native):
    """V100/T4 (capability 7.x) emulate bf16, which `torch.cuda.is_bf16_supported()` counts by default: auto keeps
    fp32 there; Ampere and later (8.0+) get bf16. The capability is asked of the device the run uses."""
    from reslab.train.step import resolve_dtype

    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    assert resolve_dtype("auto", torch.device("cuda:1")) == ("bf16" if native else "fp32")
    assert asked == [torch.device("cuda:1")]
