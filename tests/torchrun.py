"""Helpers for the tests that launch `torchrun -m reslab train` (test_distributed*.py, test_fsdp.py)."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TINY = ["--model", "tiny", "--width", "32", "--heads", "2", "--context", "16", "--batch", "8", "--eval-batches", "2",
        "--eval-interval", "10", "--log-interval", "1", "--no-progress", "--dtype", "fp32"]  # fp32: exact comparisons
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun_command(*args) -> list[str]:
    # --standalone: a free rendezvous port, so concurrent test runs do not collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "reslab", "train", *map(str, args)]


def torchrun(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(torchrun_command(*args), check=False, capture_output=True, text=True, timeout=timeout,
                            env=ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(reference: Path, other: Path, steps: int = 20, tolerance: float = 1e-5) -> None:
    """Same loss at every step, same evaluations and diagnostics, same final checkpoint (within float rounding)."""
    ours, theirs = metrics(reference), metrics(other)
    assert [r["step"] for r in theirs] == [r["step"] for r in ours] == list(range(1, steps + 1))
    for a, b in zip(ours, theirs):
        assert b["loss"] == pytest.approx(a["loss"], abs=tolerance), a["step"]
        assert b.get("val_loss") == pytest.approx(a.get("val_loss"), abs=tolerance)
        assert b["grad_norm_total"] == pytest.approx(a["grad_norm_total"], abs=tolerance)
        assert b["stream_rms"] == pytest.approx(a["stream_rms"], abs=tolerance)
        assert b["drift"] == pytest.approx(a["drift"], abs=tolerance)
    one, two = load_file(Path(reference) / "checkpoint.safetensors"), load_file(Path(other) / "checkpoint.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=tolerance, rtol=0, msg=name)
    assert json.loads((Path(other) / "summary.json").read_text())["steps"] == steps


@contextlib.contextmanager
def one_thread():
    """As each torchrun worker runs (OMP_NUM_THREADS=1); also the fastest on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_process_run(root: Path, *flags: str) -> tuple[Path, Path]:
    """(corpus, run directory) of a reference run in this process: batch 8, 20 steps."""
    from conftest import make_corpus

    from reslab.cli import main

    root.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(root / "corpus.txt")
    with one_thread():
        assert main(["train", *TINY, *flags, "--data", str(corpus), "--steps", "20", "--out", str(root / "run")]) == 0
    return corpus, root / "run"
