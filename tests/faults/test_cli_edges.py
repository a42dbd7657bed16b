"""The command line's edges, with real processes: the commands reslab prints for the user to paste run what they
say through a shell, whatever the directory is called; and a write that fails (a file size limit, as a full disk
would) is one line naming the file, with the file as it was before and no temp file left."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from faults.helpers import RUN, file_size_limit, final, one_line_error, reslab_process, tree
from faults.test_bad_input import in_an_ablation
from reslab.ablationdir import COMPARISONS_CSV, PLOTS, SUMMARY, SUMMARY_CSV

HOSTILE = "a b$(touch x)\nc"  # a space, a command substitution and a newline in one directory name


def pasted(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """`command` as a user pastes it: run by bash, with reslab's console script on the PATH."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def resume_command(output: str) -> str:
    """The command after "continue with: " (on one line)."""
    match = re.search(r"continue with: (.*)", output)
    assert match, output
    return match[1]


def test_the_printed_resume_command_continues_that_directory_and_runs_nothing_else(cli, fault_corpus, reference,
                                                                                   tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("train", *RUN, "--data", fault_corpus, "--out", HOSTILE, "--stop-at", "10")
    assert code == 0, err
    command = resume_command(out)
    assert command.startswith("reslab train --resume ")
    done = pasted(command, tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == [HOSTILE]  # no file x, no directory "a b" or "c"
    assert final(tmp_path / HOSTILE) == reference["final"]  # the run, continued where it stopped, as if never stopped


def interrupt_once(path: Path, done: threading.Event) -> None:
    """Ctrl-C this process once `path` exists (the run's first checkpoint: its Ctrl-C handler is in place)."""
    def watch() -> None:
        while not done.wait(0.02):
            if path.exists():
                os.kill(os.getpid(), signal.SIGINT)
                return
    threading.Thread(target=watch, daemon=True).start()


def test_the_resume_command_printed_after_ctrl_c_continues_that_directory(cli, fault_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    done = threading.Event()
    interrupt_once(tmp_path / HOSTILE / "state.json", done)
    try:
        code, _, err = cli("train", *RUN, "--data", fault_corpus, "--out", HOSTILE, "--steps", "100000")
    finally:
        done.set()
    assert code == 130, err
    command = resume_command(err)  # on stderr, in the error line
    step = int(re.search(r"interrupted at step (\d+)", err)[1])
    resumed = pasted(f"{command} --stop-at {step + 2}", tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"stopped at step {step + 2}" in resumed.stdout
    assert json.loads((tmp_path / HOSTILE / "state.json").read_text())["step"] == step + 2
    assert sorted(os.listdir(tmp_path)) == [HOSTILE]


# --- a write that fails -------------------------------------------------------------------------------------------

# command -> (arguments, the output file whose write fails, the size limit). OUT is a directory the test makes;
# ABLATION an ablation directory of one finished run. An older version of the file is there before the command runs.
# (The report's plots are under 64 KiB, and are written; report.html, which holds them, is over 256 KiB.)
WRITERS = {
    "report.html": (["report", "ABLATION"], "ABLATION/report.html", 128 * 1024),
    "lens --plot": (["lens", "tiny", "--tokens", "16", "--plot", "OUT"], "OUT/lens.png", 4096),
    "reproduce book-figure": (["reproduce", "book-figure", "-o", "OUT"], "OUT/book-figure.svg", 4096),
    "reproduce minimind-diagram": (["reproduce", "minimind-diagram", "-o", "OUT"], "OUT/diagram.svg", 4096),
}
OLD = b"an older version, to be kept whole\n"


@pytest.mark.parametrize("command", list(WRITERS))
def test_a_write_that_fails_names_the_file_and_keeps_the_old_one(reference, tmp_path, command):
    args, target, limit = WRITERS[command]
    in_an_ablation(reference["dir"], tmp_path / "ABLATION")
    (tmp_path / "OUT").mkdir()
    target = tmp_path / target
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(OLD)
    before = tree(tmp_path)
    args = [str(tmp_path / a) if a.split("/")[0] in ("OUT", "ABLATION") else a for a in args]
    done = reslab_process(args, preexec_fn=file_size_limit(limit))
    one_line_error(done.returncode, done.stderr)
    assert str(target) in done.stderr and "file size limit" in done.stderr
    assert target.read_bytes() == OLD
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    changed = [name for name, data in tree(tmp_path).items() if before.get(name, b"") != data]
    aggregated = "|".join(re.escape(name) for name in (SUMMARY, SUMMARY_CSV, COMPARISONS_CSV))  # rewritten by a report
    assert all(re.fullmatch(rf"ABLATION/({aggregated}|{PLOTS}.*)|OUT/design.json", name) for name in changed), changed


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_printing_to_a_full_disk_is_one_line_naming_standard_output():
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "reslab", "list"], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    one_line_error(done.returncode, done.stderr)
    assert "(standard output)" in done.stderr and "free some disk space" in done.stderr
