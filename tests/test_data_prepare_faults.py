"""A `reslab data prepare` worker killed from outside mid-prepare (as `kill -9` or the OOM killer would): one line on
stderr naming the problem and the fix, exit 2, no traceback and no hang; the same command again resumes, keeps the
shards already recorded, and ends with exactly the shards of an uninterrupted prepare. Both paths: the char fast
path on text files (`reslab.data.charprep`) and the general one (a BPE tokenizer, trained on a small sample)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_corpus

from reslab.data import charprep
from reslab.data.shards import MANIFEST, PREPARE_STATE
from reslab.errors import ReslabError

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
CLI = [sys.executable, "-m", "reslab", "data", "prepare", "--no-progress", "--workers", "2"]
# The general path starts one worker per 16 MiB of text; this runs the same CLI with one per 64 kB, so that 8 MB of
# BPE (a second of work; 8 chunks, so most are still to come when the first shard is recorded) get two workers.
SMALL_PARALLEL = [sys.executable, "-c", "import sys\nfrom reslab.data import prepare\nprepare.PARALLEL_BYTES = 65536\n"
                  "from reslab.cli import main\nsys.exit(main(['data', 'prepare', *sys.argv[1:]]))",
                  "--no-progress", "--workers", "2"]


def corpus(path: Path, copies: int) -> Path:
    """`copies` times 1 MB of play-like text, with a few non-ASCII characters (the slower, decoding branch)."""
    block = make_corpus(path.with_suffix(".base"), chars=1_000_000).read_text().replace("queen", "quéén")
    path.write_text(block * copies)
    return path


def workers(pid: int) -> list[int]:
    """The pids of a process's spawned pool workers (not multiprocessing's resource tracker, also its child)."""
    try:
        import psutil

        found = []
        for child in psutil.Process(pid).children():
            try:
                found.append((child.pid, " ".join(child.cmdline())))
            except psutil.Error:  # it ended meanwhile
                pass
    except ImportError:
        found = []
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            for child in map(int, children.read_text().split()):
                try:
                    found.append((child, Path(f"/proc/{child}/cmdline").read_bytes().decode().replace("\0", " ")))
                except OSError:
                    pass
    return [child for child, command in found if "spawn_main" in command]


def as_in_a_terminal() -> None:
    """In the child: SIGINT as a terminal's foreground job has it. A suite started in the background by a shell
    (`... &`) runs with SIGINT ignored, which children inherit, and an ignored Ctrl-C would stop nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stopped(pid: int) -> bool:
    """Whether the process is stopped (state T in /proc: it sent itself SIGSTOP)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def recorded(out: Path) -> list[dict]:
    """The shards an unfinished prepare's state lists as done (none before the state exists)."""
    try:
        return json.loads((out / PREPARE_STATE).read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return []


def kill_a_worker(command: list, out: Path) -> subprocess.CompletedProcess:
    """Start the prepare; once its state records a shard, SIGKILL one of its workers; the finished process."""
    process = subprocess.Popen([*command, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=ENV, start_new_session=True)  # its own group: nothing outlives the test
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            pids = workers(process.pid)
            if pids and recorded(out):
                os.kill(pids[0], signal.SIGKILL)
                break
            time.sleep(0.002)
        else:
            pytest.fail(f"the prepare ended (exit {process.poll()}) before a worker could be killed")
        stdout, stderr = process.communicate(timeout=60)  # multiprocessing.Pool waited here forever
    except subprocess.TimeoutExpired:
        pytest.fail("the prepare hung after one of its workers was killed")
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)  # the prepare and its workers
            process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run(command: list, out: Path) -> dict:
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads((out / MANIFEST).read_text())


def stamps(out: Path, shards: list[dict]) -> dict[str, tuple[int, int]]:
    return {s["name"]: ((out / s["name"]).stat().st_ino, (out / s["name"]).stat().st_mtime_ns) for s in shards}


@pytest.mark.parametrize("path", ["char", "bpe"])
def test_a_killed_worker_is_one_line_and_the_same_command_resumes_it(tmp_path, path):
    if path == "char":  # 34 MB: two workers on the char path, as a user gets them
        command = [*CLI, corpus(tmp_path / "text.txt", 34), "--shard-tokens", "262144"]
    else:
        command = [*SMALL_PARALLEL, corpus(tmp_path / "text.txt", 8), "--tokenizer", "bpe", "--vocab-size", "300",
                   "--bpe-sample-mb", "0.2", "--shard-tokens", "50000"]
    killed = kill_a_worker(command, tmp_path / "data")
    lines = killed.stderr.strip().splitlines()
    assert killed.returncode == 2 and "Traceback" not in killed.stderr, killed.stderr
    assert lines == ["reslab: error: a prepare worker died (killed?); run the same command again to resume"]
    kept = recorded(tmp_path / "data")
    assert kept and not (tmp_path / "data" / MANIFEST).exists()
    before = stamps(tmp_path / "data", kept)

    resumed = run(command, tmp_path / "data")
    whole = run(command, tmp_path / "whole")
    assert stamps(tmp_path / "data", kept) == before  # the shards recorded before the kill were kept, not redone
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in whole["shards"]]
    assert resumed["fingerprint"] == whole["fingerprint"] and len(whole["shards"]) > len(kept)
    names = [sorted(p.name for p in (tmp_path / folder).iterdir()) for folder in ("data", "whole")]
    assert names[0] == names[1]  # no temp file of a killed write left, no state file


def test_a_worker_that_dies_between_two_passes_is_the_same_one_line():
    """The char path maps twice (scan, then encode): a worker killed while idle in between breaks the next map."""
    pool = charprep.Workers(2)
    try:
        pids = {int(pid) for pid in pool.map(os.readlink, ["/proc/self"] * 4)}  # a worker's own pid
        os.kill(pids.pop(), signal.SIGKILL)
        time.sleep(0.5)  # the pool notices the death at once: the next map fails when it submits
        with pytest.raises(ReslabError, match=r"^a prepare worker died \(killed\?\); run the same command again"):
            list(pool.map(len, ["ab"]))
    finally:
        pool.close()


def test_ctrl_c_stops_the_prepare_in_one_line_and_the_same_command_resumes(tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the whole process group, workers included: the parent alone reports
    it (exit 130, no worker's traceback), and the same command then finishes with the shards of a whole prepare."""
    command = [*CLI, corpus(tmp_path / "text.txt", 34), "--shard-tokens", "262144"]
    out = tmp_path / "data"
    # The parent stops itself (a failpoint, as Ctrl-Z) while writing its state after the first shards: Ctrl-C then
    # lands with work still to do on any machine, however loaded (a poll for "a shard is recorded" could catch the
    # prepare as it finished).
    env = {**ENV, "RESLAB_FAILPOINTS": f"write:{PREPARE_STATE}@3=stop"}
    process = subprocess.Popen([*command, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, start_new_session=True, preexec_fn=as_in_a_terminal)
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline and not stopped(process.pid):
            time.sleep(0.01)
        assert stopped(process.pid) and recorded(out) and workers(process.pid), "the prepare did not stop mid-way"
        os.killpg(process.pid, signal.SIGINT)  # what the terminal does
        os.kill(process.pid, signal.SIGCONT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 130 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert [s["sha256"] for s in run(command, out)["shards"]] == [s["sha256"] for s in run(command,
                                                                                            tmp_path / "w")["shards"]]
