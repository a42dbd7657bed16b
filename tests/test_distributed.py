"""`torchrun -m reslab train` with DDP: 2 processes follow 1 process through a resume; micro-batches; bad input.

Each torchrun launch costs seconds of process start-up, so launches are few and the model tiny. Failing ranks:
test_distributed_faults.py; FSDP2: test_fsdp.py.
"""

import json
import time
from pathlib import Path

import pytest
from torchrun import TINY, assert_same_run, metrics, one_process_run, one_thread, torchrun


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, Path]:
    return one_process_run(tmp_path_factory.mktemp("one"))


def test_two_processes_follow_one_process_through_a_resume(one_process, tmp_path):
    corpus, reference = one_process
    run = tmp_path / "two"
    started = time.perf_counter()
    stopped = torchrun(*TINY, "--data", corpus, "--steps", "20", "--stop-at", "10", "--out", run)
    assert stopped.stdout.count("stopped at step 10") == 1  # rank 0 alone prints
    assert len(metrics(run)) == 10 and not (run / "summary.json").exists()  # rank 0 alone writes
    finished = torchrun("--resume", run, "--no-progress")  # every rank loads the checkpoint
    print(f"2 processes, 2 launches: {time.perf_counter() - started:.1f} s")
    assert finished.stdout.count("run: ") == 1
    assert_same_run(reference, run)
    assert json.loads((run / "config.json").read_text())["train"]["batch"] == 8  # the global batch


def test_gradient_accumulation_follows_one_batch(one_process, cli, tmp_path):
    corpus, reference = one_process
    with one_thread():
        code, _, err = cli("train", *TINY, "--data", corpus, "--steps", "20", "--grad-accum", "4",
                           "--out", tmp_path / "acc")
    assert code == 0, err
    assert_same_run(reference, tmp_path / "acc")


@pytest.mark.parametrize("flags, message", [
    (["--batch", "6"], "--batch 6 is not divisible by 2 process(es) x --grad-accum 2 = 4"),
    (["--batch", "7", "--grad-accum", "1"], "--batch 7 is not divisible by 2 process(es) x --grad-accum 1 = 2"),
])
def test_batch_must_split_over_ranks_and_micro_batches(cli, corpus, tmp_path, monkeypatch, flags, message):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets them; the check runs before the process group exists
    monkeypatch.setenv("RANK", "0")
    code, _, err = cli("train", *TINY, "--data", corpus, "--steps", "2", "--grad-accum", "2", *flags,
                       "--out", tmp_path / "run")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_bad_distributed_flags_are_one_line(cli, corpus, tmp_path):
    code, _, err = cli("train", *TINY, "--data", corpus, "--steps", "2", "--fsdp", "--out", tmp_path / "run")
    assert code == 2 and "--fsdp" in err and "torchrun" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli("train", *TINY, "--data", corpus, "--steps", "2", "--grad-accum", "3", "--out", tmp_path / "run")
    assert code == 2 and "--grad-accum 3" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_two_processes_log_the_global_batch_stream_gain(one_process, cli, tmp_path):
    """Dynamic HC's Amax gain is a max over tokens: with the batch split over ranks, the logged figure is the max
    over ranks, so it equals the one-process run's on the same global batch (rank 0's half alone falls short)."""
    corpus, _ = one_process
    # a high learning rate, so that after a few steps the tokens' gains differ and a half batch would show it
    flags = [*TINY, "--residual", "hc", "--hc-dynamic", "--lr", "1e-2", "--data", corpus, "--steps", "20"]
    with one_thread():
        code, _, err = cli("train", *flags, "--out", tmp_path / "one")
    assert code == 0, err
    torchrun(*flags, "--out", tmp_path / "two")
    single, double = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(single) == len(double) == 20
    for a, b in zip(single, double, strict=True):
        for key in ("amax_gain_forward", "amax_gain_backward"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
