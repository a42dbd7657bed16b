"""A rank of a `torchrun -m reslab train` job that dies or hangs ends the job with a clear message, never a hang."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_corpus
from torchrun import ENV, TINY, torchrun_command

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")


def _workers(pid: int) -> dict[int, int]:
    """rank -> pid of the workers that torchrun (pid) started."""
    workers = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        workers[next(int(e[5:]) for e in env if e.startswith(b"RANK="))] = int(child)
    return workers


def _start_long_run(tmp_path: Path) -> tuple[subprocess.Popen, dict[int, int]]:
    """A job that would run for hours, once it has logged 3 steps."""
    run = tmp_path / "run"
    command = torchrun_command(*TINY, "--width", "16", "--data", make_corpus(tmp_path / "corpus.txt"),
                               "--steps", "100000", "--out", run, "--dist-timeout", "3")
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    deadline = time.monotonic() + 90
    while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0]
        time.sleep(0.2)
    return job, _workers(job.pid)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_rank_ends_the_job_with_a_clear_message(tmp_path):
    job, workers = _start_long_run(tmp_path)
    os.kill(workers[1], signal.SIGKILL)
    killed = time.monotonic()
    output, _ = job.communicate(timeout=60)
    assert job.returncode != 0 and time.monotonic() - killed < 30, output
    # torchrun names the rank that failed first and stops the others (rank 0 may first say what it saw)
    assert "Root Cause" in output and "rank      : 1" in output and "SIGKILL" in output, output


def test_a_hung_rank_times_out_with_a_clear_message(tmp_path):
    job, workers = _start_long_run(tmp_path)
    os.kill(workers[1], signal.SIGSTOP)  # alive but silent: only the timeout can end rank 0's wait
    stopped = time.monotonic()
    try:
        while _running(workers[0]):
            assert time.monotonic() - stopped < 45, "rank 0 still waits for the stopped rank"
            time.sleep(0.2)
        waited = time.monotonic() - stopped
    finally:
        os.kill(workers[1], signal.SIGCONT)  # so torchrun's SIGTERM can end it
    output, _ = job.communicate(timeout=60)
    assert job.returncode != 0 and waited < 30, output
    assert "reslab: error: rank 0 of 2: a collective operation failed (Timed out" in output, output
    assert "--dist-timeout 3 s" in output and "--resume" in output
