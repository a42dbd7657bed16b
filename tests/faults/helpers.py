"""Shared by the fault-injection tests: a small run, a way to start it as a real process with a fault armed, and the
comparisons that say a recovered run is the run that was never interrupted."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from reslab.rundir import TIMING_KEYS as TIMING  # the only fields two equal runs may differ in

# A run small enough to train in about a second, with dropout (so the RNG state matters to exact resume), several
# log, eval and checkpoint steps, and a tail after the last checkpoint before the end.
RUN = ["--model", "tiny", "--width", "32", "--heads", "2", "--context", "16", "--batch", "8", "--dropout", "0.1",
       "--eval-batches", "2", "--no-progress", "--steps", "24", "--log-interval", "4", "--eval-interval", "8",
       "--checkpoint-interval", "5", "--warmup", "3", "--lr", "3e-3"]


def reslab_process(args: list, env: dict | None = None, preexec_fn=None, timeout: float = 120,
                   cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m reslab ARGS` as its own process (so a fault can kill it), one thread, with `env` added."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "reslab", *map(str, args)], capture_output=True, text=True,
                          env=full_env, preexec_fn=preexec_fn, timeout=timeout, cwd=cwd)


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl without its timing fields (the only values two runs of the same config may differ in)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def final(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    return {k: summary[k] for k in ("steps", "final_val_loss", "best_val_loss", "final_train_loss", "mean_drift")}


def stray_temp_files(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))


def tree(directory: Path) -> dict[str, bytes | None]:
    """Every file and directory under `directory` with its bytes: equal before and after means nothing changed.
    (A run's lock file is compared by presence only: it records the pid of the last process that held it. The temp
    file of a write in progress by another process is left out: it exists only until that write's rename.)"""
    found: dict[str, bytes | None] = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.name.endswith(".tmp"):
            continue
        key = str(path.relative_to(directory))
        readable = path.is_file() and not path.is_symlink() and path.name != ".reslab-lock"
        found[key] = path.read_bytes() if readable else None
    return found


def one_line_error(code: int, err: str) -> None:
    """The promise for bad input: exit code 2, one line on stderr that names the problem, no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith(("reslab: error:", "reslab ")), err
    assert "Traceback" not in err


def file_size_limit(limit: int):
    """For preexec_fn: writes past `limit` bytes fail with EFBIG (the signal that would kill the process ignored),
    as a full disk fails them with ENOSPC."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return apply
