"""One process per run directory, and no orphaned workers: the lock is the OS's (released when its holder dies,
however it dies), and ablation workers end with the ablation that started them."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from faults.helpers import RUN, final, one_line_error, tree


def start(args: list, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "reslab", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def holder(run: Path) -> str:
    lock = run / ".reslab-lock"
    return lock.read_text() if lock.exists() else ""


def test_a_second_process_on_a_run_is_refused_and_the_lock_dies_with_its_holder(cli, fault_corpus, tmp_path):
    run = tmp_path / "run"
    long_run = [*RUN, "--steps", "100000", "--checkpoint-interval", "50"]
    first = start(["train", *long_run, "--data", fault_corpus, "--out", run])
    try:
        wait_for(lambda: f"pid {first.pid}" in holder(run) and (run / "checkpoint.safetensors").exists())
        before = tree(run)
        code, _, err = cli("train", "--resume", run, "--no-progress")
        one_line_error(code, err)
        assert f"pid {first.pid}" in err
        code, _, err = cli("train", *long_run, "--data", fault_corpus, "--out", run, "--overwrite")
        one_line_error(code, err)
        assert f"pid {first.pid}" in err
        assert set(tree(run)) >= set(before)  # the holder goes on writing; nothing of it was removed
    finally:
        first.kill()
        first.wait()
    code, _, err = cli("train", "--resume", run, "--no-progress", "--steps",
                       str(_checkpoint_step(run) + 2))  # the OS released the lock of the killed holder
    assert code == 0, err
    assert final(run)["steps"] == _checkpoint_step(run)


def _checkpoint_step(run: Path) -> int:
    """The step of the checkpoint itself (state.json, its readable copy, is written just after it: a kill may land
    between the two)."""
    from reslab.train.checkpoint import checkpoint_step

    return checkpoint_step(run / "checkpoint.safetensors")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_killing_the_ablation_kills_its_workers(fault_corpus, tmp_path):
    out = tmp_path / "ablation"
    parent = start(["ablate", "--model", "tiny", "--width", "32", "--heads", "2", "--context", "16", "--batch", "8",
                    "--residual", "pre,none", "--seeds", "0", "--steps", "100000", "--jobs", "2", "--data",
                    fault_corpus, "--out", out, "--no-report", "--checkpoint-interval", "50"])
    try:
        wait_for(lambda: len(list(out.glob("runs/*/checkpoint.safetensors"))) == 2, timeout=120)
        workers = [pid for pid in _children(parent.pid) if "spawn_main" in _cmdline(pid)]
        assert len(workers) >= 2
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        wait_for(lambda: not any(_alive(pid) for pid in workers), timeout=10)
    finally:
        parent.kill()


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(cli, fault_corpus, tmp_path):
    """The lock is truncated and rewritten by its holder: a `.reslab-lock` that links elsewhere would truncate the
    file it points at. Refused in one line; the target is left as it was."""
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's own words\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".reslab-lock").symlink_to(precious)
    code, _, err = cli("train", *RUN, "--data", fault_corpus, "--out", run)
    one_line_error(code, err)
    assert ".reslab-lock" in err and precious.read_text() == "the user's own words\n"
