"""What runs show while they run: the train bar (every step, a measured ETA, 80 columns), plain lines off a terminal
from step 0, notes never hard-wrapped when piped, the ablation's live display, and `train --json` on a stop."""

import io
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter

from rich.console import Console

from reslab.ablate.point import GridJob, GridPoint
from reslab.ablate.progress import GridProgress
from reslab.train.loggers import Reporter

TINY = ["--model", "tiny", "--width", "16", "--heads", "2", "--context", "16", "--batch", "4", "--eval-batches", "1",
        "--dtype", "fp32"]
GRID = ["ablate", "--width", "16", "--heads", "2", "--context", "16", "--batch", "4", "--eval-batches", "1",
        "--eval-interval", "4", "--log-interval", "2", "--steps", "4", "--layers", "1", "--seeds", "0", "--no-report",
        "--jobs", "1"]
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def terminal(width: int = 80) -> Console:
    return Console(width=width, force_terminal=True, record=True, file=io.StringIO(), highlight=False)


def last_frame(console: Console) -> list[str]:
    """The live display's last drawing, as text lines (rich redraws it after erasing the lines before)."""
    text = console.file.getvalue().split("\x1b[2K")[-1]
    return [line for line in ESCAPE.sub("", text).replace("\r", "").splitlines() if line.strip()]


def test_train_bar_moves_every_step_with_a_real_eta_in_80_columns():
    console = terminal()
    reporter = Reporter(console=console)
    reporter.start(2000, 0, "deepseek / value-residual with a long name")
    for step in range(1, 124):
        time.sleep(0.001)
        reporter.advance(step)  # no log record: the count still moves
    reporter.update(123, 3.1234, 3.2, 12345.0, eval_done=True)
    reporter.stop()
    (line,) = last_frame(console)
    assert len(line) <= 80 and " 123/2000 " in line, line
    eta = re.search(r"ETA (\S+)", line).group(1)
    assert re.fullmatch(r"\d+:\d\d:\d\d", eta) and eta != "0:00:00", line  # ~1 ms a step x 1877 steps to go
    assert "deepseek" in line and "…" in line  # the name gives way, cut, not the count


def test_train_plain_lines_off_a_terminal():
    out = io.StringIO()
    reporter = Reporter(console=Console(file=out, width=80))
    reporter.start(100, 0, "tiny / pre")
    for step in range(1, 101):
        reporter.advance(step)
        if step % 50 == 0:
            reporter.update(step, 2.5, 2.6, 1000.0, eval_done=step == 100)
    reporter.note(" ".join(["a note"] * 30))
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["training tiny / pre: steps 0 -> 100", "step   0/100",
                         lines[2]] and lines[2].startswith("step  50/100  loss 2.5000  1,000 tok/s  ETA ")
    assert lines[3].startswith("step 100/100  loss 2.5000  val 2.6000  1,000 tok/s")
    assert lines[4] == " ".join(["a note"] * 30) and len(lines) == 5  # one line, not wrapped at 80


def test_piped_train_prints_from_step_0_and_never_wraps_a_note(cli, corpus, tmp_path):
    run = tmp_path / ("a-run-directory-with-a-name-long-enough-that-a-note-naming-it-passes-eighty-columns" * 2)
    command = [sys.executable, "-m", "reslab", "train", *TINY, "--data", str(corpus), "--steps", "4",
               "--log-interval", "2", "--eval-interval", "4", "--out", str(run)]
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stderr
    steps = [line for line in done.stderr.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["0/4", "2/4", "4/4"], done.stderr
    assert "loss" in steps[1] and "tok/s" in steps[1] and "val" not in steps[1] and "val" in steps[2]
    code, _, err = cli("train", "--resume", run)  # in-process, stderr captured: not a terminal either
    assert code == 0
    (note,) = [line for line in err.splitlines() if "already finished" in line]
    assert str(run) in note and note.endswith("to continue"), err


def test_train_json_on_a_stop(cli, corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    code, out, err = cli("train", *TINY, "--data", corpus, "--steps", "6", "--stop-at", "2", "--out", run, "--json")
    assert code == 0, err
    stopped = json.loads(out)
    assert stopped["stopped_at"] == 2 and stopped["resume_command"] == f"reslab train --resume {run}"

    from reslab import io as reslab_io

    monkeypatch.setattr(reslab_io, "_hits", Counter())
    monkeypatch.setenv("RESLAB_FAILPOINTS", "step@1=sigint")  # Ctrl-C during the first step of the resumed run
    code, out, err = cli("train", "--resume", run, "--json")
    assert code == 130 and json.loads(out)["stopped_at"] == 3 and json.loads(out)["interrupted"] is True
    assert [line for line in err.splitlines() if line.startswith("reslab: error")] == [
        f"reslab: error: interrupted at step 3; checkpoint saved, continue with: reslab train --resume {run}"]


def test_train_json_error_stays_a_one_line_error(cli, corpus, tmp_path):
    code, out, err = cli("train", *TINY, "--data", tmp_path / "missing.txt", "--out", tmp_path / "run", "--json")
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith("reslab: error:")


def grid(tmp_path, names):
    job = GridJob("tiny", {}, {"steps": 20}, tmp_path, time.time())
    points = [GridPoint(residual, 1, 0) for residual in names]
    for point in points:
        job.run_dir(point).mkdir(parents=True)
    return job, points


def write_record(job, point, step):
    with open(job.run_dir(point) / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"step": step, "loss": 3.0 - step / 100}) + "\n")


def wait_for(console, text, seconds=5.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if any(text in line for line in last_frame(console)):
            return last_frame(console)
        time.sleep(0.02)
    raise AssertionError(f"{text!r} never shown: {last_frame(console)}")


def test_ablation_display_on_a_terminal(tmp_path):
    console = terminal()
    job, (first, second) = grid(tmp_path, ["pre", "post"])
    with GridProgress(console, job, [first, second], done_before=1, interval=0.02) as progress:
        wait_for(console, "1/3 done, 0 running, 2 queued")
        write_record(job, first, 5)
        wait_for(console, " 5/20 ")
        write_record(job, first, 10)  # two records seen: the point's own ETA, and the grid's
        frame = wait_for(console, "10/20")
        (row,) = [line for line in frame if line.startswith("pre-L1-s0")]
        assert "10/20" in row and "loss 2.9000" in row and "ETA -:--:--" not in row, frame
        (overall,) = [line for line in frame if line.startswith("grid")]
        assert "10/40" in overall and "ETA -:--:--" not in overall, frame
        assert all(len(line) <= 80 for line in frame)
        progress.finished(first)
        frame = wait_for(console, "2/3 done, 0 running, 1 queued")
        assert not any(line.startswith("pre-L1-s0") for line in frame)
        assert progress.counts_note() == ""  # on a terminal the display shows the counts


def test_ablation_lines_off_a_terminal(cli, corpus, tmp_path):
    code, _, err = cli(*GRID, "--residual", "pre,none", "--data", corpus, "--out", tmp_path / "abl")
    assert code == 0, err
    assert "\x1b" not in err and "\r" not in err
    lines = err.splitlines()
    assert re.fullmatch(r"  pre-L1-s0 +started \(0/2 done, 1 running, 1 queued\)", lines[1]), err
    assert re.fullmatch(r"  pre-L1-s0 +val \S+  \S+ tok/s  \(1/2 done, 0 running, 1 queued, ETA \S+\)", lines[2]), err
    assert re.fullmatch(r"  none-L1-s0 +started \(1/2 done, 1 running, 0 queued\)", lines[3]), err
    assert re.fullmatch(r"  none-L1-s0 +val \S+  \S+ tok/s  \(2/2 done, 0 running, 0 queued\)", lines[4]), err


def test_ablation_live_display_of_a_real_grid(corpus, tmp_path):
    from reslab.ablate.grid import run_ablation

    console = terminal()
    train = {"data": str(corpus), "steps": 4, "log_interval": 2, "eval_interval": 4, "eval_batches": 1, "batch": 4}
    run_ablation(tmp_path / "abl", "tiny", ["pre"], [1], [0], {"width": 16, "heads": 2, "context": 16}, train,
                 console=console)
    text = ESCAPE.sub("", console.file.getvalue())
    assert "pre-L1-s0" in text and "1/1 done, 0 running, 0 queued" in last_frame(console)[-1]
    assert all(len(line) <= 80 for line in last_frame(console))
