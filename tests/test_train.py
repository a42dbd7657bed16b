"""`reslab train`, `--resume`, `reslab sample`: run directories, exact resume, diagnostics, bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reslab.train.checkpoint import load_run_model

FAST = ["--model", "tiny", "--width", "32", "--heads", "2", "--context", "16", "--batch", "8",
        "--eval-batches", "2", "--no-progress"]


def printed_losses(stdout: str) -> str:
    """The 'val loss X (best Y)' of the final line, as printed."""
    match = re.search(r"val loss \S+ \(best \S+\)", stdout)
    assert match, stdout
    return match.group(0)


def files_snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_train_writes_a_complete_run_directory(cli, corpus, tmp_path):
    run = tmp_path / "run"
    code, out, err = cli("train", *FAST, "--layers", "2", "--residual", "pre", "--data", corpus, "--steps", "30",
                         "--log-interval", "10", "--eval-interval", "15", "--out", run, "--json", "--warmup", "5",
                         "--lr", "3e-3")
    assert code == 0, err
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "tokenizer.reslab.json", "metrics.jsonl", "checkpoint.safetensors", "state.json",
            "summary.json"} <= names
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "tiny" and config["model_config"]["layers"] == 2
    assert config["model_config"]["vocab_size"] == len(set(corpus.read_text()))
    assert config["train"]["steps"] == 30 and config["data"]["sha256"]

    summary = json.loads(out)
    assert summary == json.loads((run / "summary.json").read_text())
    for key in ("final_train_loss", "final_val_loss", "best_val_loss", "steps", "tokens_per_second", "parameters"):
        assert summary[key] is not None, key
    assert summary["steps"] == 30 and summary["best_val_loss"] <= summary["final_val_loss"]
    vocab = config["model_config"]["vocab_size"]
    assert summary["final_val_loss"] < torch.log(torch.tensor(vocab)).item() - 0.5  # it learned

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 15, 20, 30]
    logged = records[0]
    model = load_run_model(run)[0]
    assert set(logged["grad_norms"]) == {name for name, _ in model.named_parameters()}
    assert logged["grad_norm_total"] == pytest.approx(
        sum(v * v for v in logged["grad_norms"].values()) ** 0.5, rel=1e-4)
    assert len(logged["stream_rms"]) == 2 and len(logged["drift"]) == 2
    assert [len(r) for r in logged["update_ratio"]] == [2, 2]
    assert all(-1.0 <= d <= 1.0 for d in logged["drift"])
    assert logged["first_layer_grad_share"] == pytest.approx(
        logged["block_grad_norms"][0] / logged["block_grad_norms"][1])
    assert "val_loss" in records[1] and "grad_norms" not in records[1]  # an eval-only step
    assert "val_loss" in records[-1] and "grad_norms" in records[-1]


def test_checkpoint_is_safetensors_with_optimizer_and_rng(cli, corpus, tmp_path):
    run = tmp_path / "run"
    assert cli("train", *FAST, "--data", corpus, "--steps", "5", "--out", run)[0] == 0
    tensors = load_file(run / "checkpoint.safetensors")
    assert any(k.startswith("model.") for k in tensors)
    assert any(k.startswith("optimizer.") and k.endswith("exp_avg") for k in tensors)
    assert {"rng.torch", "rng.batch"} <= set(tensors)
    assert json.loads((run / "state.json").read_text())["step"] == 5


def test_stop_and_resume_ends_exactly_like_an_uninterrupted_run(cli, corpus, tmp_path):
    args = [*FAST, "--layers", "2", "--dropout", "0.1", "--data", corpus, "--steps", "40", "--log-interval", "5",
            "--eval-interval", "20", "--checkpoint-interval", "15"]
    code, whole, err = cli("train", *args, "--out", tmp_path / "whole")
    assert code == 0, err
    code, out, err = cli("train", *args, "--out", tmp_path / "split", "--stop-at", "23")
    assert code == 0 and "stopped at step 23" in out
    assert json.loads((tmp_path / "split" / "state.json").read_text())["step"] == 23
    code, resumed, err = cli("train", "--resume", tmp_path / "split", "--no-progress")
    assert code == 0, err
    assert printed_losses(resumed) == printed_losses(whole)  # to the last digit printed
    whole_summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    split_summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert split_summary["final_val_loss"] == whole_summary["final_val_loss"]
    drop = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_second", "train_seconds")}  # noqa: E731
    read = lambda d: [drop(json.loads(l)) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731,E741
    assert read("split") == read("whole")


def test_kill_9_leaves_a_loadable_checkpoint_and_resume_matches(corpus, tmp_path):
    """SIGKILL at an arbitrary moment: the last checkpoint loads, and resuming reaches the uninterrupted result."""
    args = [sys.executable, "-m", "reslab", "train", *FAST, "--data", str(corpus), "--steps", "400",
            "--log-interval", "50", "--eval-interval", "400", "--checkpoint-interval", "7"]
    whole = subprocess.run([*args, "--out", str(tmp_path / "whole")], capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    run = tmp_path / "killed"
    process = subprocess.Popen([*args, "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        state = run / "state.json"
        if state.exists() and json.loads(state.read_text() or "{}").get("step", 0) >= 30:
            break
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    step = json.loads((run / "state.json").read_text())["step"]
    assert 30 <= step < 400
    model, _ = load_run_model(run)  # the checkpoint on disk is whole
    assert model(torch.zeros(1, 4, dtype=torch.long)).logits.shape[-1] == model.config.vocab_size
    resumed = subprocess.run([sys.executable, "-m", "reslab", "train", "--resume", str(run), "--no-progress"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert printed_losses(resumed.stdout) == printed_losses(whole.stdout)


def test_sample_is_seeded_and_continues_the_prompt(cli, corpus, tmp_path):
    run = tmp_path / "run"
    assert cli("train", *FAST, "--data", corpus, "--steps", "60", "--out", run)[0] == 0
    code, first, err = cli("sample", run, "--prompt", "ROMEO:", "--tokens", "40", "--seed", "3", "--top-k", "5")
    assert code == 0, err
    assert first.startswith("ROMEO:") and len(first.rstrip("\n")) >= 40
    assert cli("sample", run, "--prompt", "ROMEO:", "--tokens", "40", "--seed", "3", "--top-k", "5")[1] == first
    assert cli("sample", run, "--prompt", "ROMEO:", "--tokens", "40", "--seed", "4", "--top-p", "0.9")[1] != first
    code, _, err = cli("sample", run, "--prompt", "the \u00e9", "--tokens", "5")
    assert code == 2 and "U+00E9" in err


def test_print_grad_norms_prints_every_parameter(cli, corpus, tmp_path):
    code, _, err = cli("train", *FAST, "--data", corpus, "--steps", "4", "--log-interval", "2", "--out",
                       tmp_path / "run", "--print-grad-norms")
    assert code == 0
    assert "step 2: gradient norms" in err and "blocks.0.attn.qkv.weight:" in err and "head.weight:" in err


def test_bpe_tokenizer_and_tensorboard(cli, corpus, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    code, _, err = cli("train", *FAST, "--data", corpus, "--tokenizer", "bpe", "--vocab-size", "300", "--steps", "4",
                       "--log-interval", "2", "--out", run)
    assert code == 0, err
    assert json.loads((run / "tokenizer.reslab.json").read_text())["kind"] == "bpe"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert cli("sample", run, "--prompt", "the king", "--tokens", "5")[0] == 0


def test_pickle_checkpoint_is_refused(cli, corpus, tmp_path):
    run = tmp_path / "run"
    assert cli("train", *FAST, "--data", corpus, "--steps", "2", "--out", run)[0] == 0
    torch.save({"weights": torch.zeros(2)}, run / "checkpoint.safetensors")
    code, _, err = cli("sample", run, "--tokens", "3")
    assert code == 2 and "pickle" in err and "safetensors" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("train", "--resume", run, "--no-progress")
    assert code == 2 and "pickle" in err


def test_source_never_unpickles():
    source = Path(__file__).resolve().parents[1] / "src" / "reslab"
    for path in source.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line or "pickle.load" in line:
                assert "weights_only=True" in line, f"{path}:{number}: {line.strip()}"


@pytest.mark.parametrize("case", ["empty", "binary", "latin1", "short", "missing", "directory"])
def test_bad_data_is_one_line_and_writes_nothing(cli, tmp_path, case):
    data = tmp_path / "data.txt"
    if case == "empty":
        data.write_text("")
    elif case == "binary":
        data.write_bytes(b"abc\x00\x01\x02" * 100)
    elif case == "latin1":
        data.write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    elif case == "short":
        data.write_text("too short for the context")
    elif case == "directory":
        data.mkdir()
    run = tmp_path / "run"
    code, _, err = cli("train", *FAST, "--data", data, "--steps", "2", "--out", run)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("reslab: error:")
    assert not run.exists()
    if case == "short":
        assert "--context 16" in err


def test_existing_run_is_not_clobbered(cli, corpus, tmp_path):
    run = tmp_path / "run"
    assert cli("train", *FAST, "--data", corpus, "--steps", "3", "--out", run)[0] == 0
    before = files_snapshot(run)
    code, _, err = cli("train", *FAST, "--data", corpus, "--steps", "3", "--out", run)
    assert code == 2 and "--resume" in err and "--overwrite" in err
    assert files_snapshot(run) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    code, _, err = cli("train", *FAST, "--data", corpus, "--steps", "3", "--out", other, "--overwrite")
    assert code == 2 and "not a reslab run directory" in err
    assert (other / "thesis.tex").read_text() == "precious"
    assert cli("train", *FAST, "--data", corpus, "--steps", "4", "--out", run, "--overwrite")[0] == 0
    assert json.loads((run / "state.json").read_text())["step"] == 4


def test_incompatible_resume_is_refused(cli, corpus, tmp_path):
    run = tmp_path / "run"
    assert cli("train", *FAST, "--data", corpus, "--steps", "3", "--out", run)[0] == 0
    before = files_snapshot(run)
    for flags, message in [(["--width", "64"], "model width 64 differs"), (["--lr", "0.1"], "--lr 0.1 differs"),
                           (["--model", "gpt"], "--model gpt differs")]:
        code, _, err = cli("train", "--resume", run, *flags, "--no-progress")
        assert code == 2 and message in err, err
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text()[::-1])
    code, _, err = cli("train", "--resume", run, "--data", other, "--no-progress")
    assert code == 2
    code, _, err = cli("train", "--resume", tmp_path / "nothing", "--no-progress")
    assert code == 2 and "not a reslab run directory" in err
    assert files_snapshot(run) == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cli, corpus, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", *FAST, "--residual", "add", "--data", corpus, "--steps", "50", "--lr", "1e30",
                       "--warmup", "0", "--grad-clip", "0", "--log-interval", "1", "--checkpoint-interval", "1",
                       "--out", run)
    assert code == 2 and ("non-finite" in err or "nan" in err.lower())
    assert len(err.strip().splitlines()) == 1
    step = json.loads((run / "state.json").read_text())["step"]
    assert f"last good checkpoint (step {step})" in err
    load_run_model(run)  # still loadable


def test_tinyshakespeare_file(cli, tinyshakespeare, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", "--model", "gpt", "--layers", "1", "--width", "32", "--heads", "2", "--batch", "4",
                       "--data", tinyshakespeare, "--steps", "3", "--eval-batches", "1", "--out", run, "--no-progress")
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["model_config"]["vocab_size"] == 65
    assert config["data"]["train_tokens"] == 1_003_854 and config["data"]["val_tokens"] == 111_540


def test_recipe_sets_defaults_and_flags_override(cli, corpus, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", "--recipe", "nanogpt-cpu", "--context", "16", "--steps", "2", "--eval-batches", "1",
                       "--data", corpus, "--out", run, "--no-progress")
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "gpt"
    assert (config["model_config"]["layers"], config["model_config"]["width"], config["model_config"]["context"]) == (
        4, 128, 16)
    assert (config["train"]["batch"], config["train"]["min_lr"], config["train"]["steps"]) == (12, 1e-4, 2)
    code, _, err = cli("train", "--recipe", "nanogpt-cpu", "--model", "llama", "--data", corpus, "--out",
                       tmp_path / "other")
    assert code == 2 and "recipe 'nanogpt-cpu' trains model 'gpt'" in err
    code, _, err = cli("train", "--recipe", "fast", "--context", "16", "--steps", "2", "--eval-batches", "1",
                       "--data", corpus, "--out", tmp_path / "fast", "--no-progress")
    assert code == 0, err
    config = json.loads((tmp_path / "fast" / "config.json").read_text())
    assert (config["model_config"]["activation"], config["train"]["optimizer"], config["train"]["batch"]) == (
        "gelu", "muon", 24)
