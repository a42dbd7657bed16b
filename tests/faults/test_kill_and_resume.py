"""kill -9, Ctrl-C and a full disk at every kind of moment of a run, landed deterministically with failpoints
(`reslab.io`): inside each file write, inside a step, inside an evaluation, before a checkpoint. After each,
the run is recovered the way a user would (`--resume`, or the same command again when it died before its config
existed) and must end bit-identical to the uninterrupted run: the same metrics.jsonl (timing aside) and losses."""

import json
import resource
import signal

import pytest
from safetensors.torch import load_file

from faults.helpers import RUN, final, metrics, one_line_error, reslab_process, stray_temp_files

KILLED = -signal.SIGKILL
INTERRUPTED = 130

# (failpoint, exit code of the faulted process, how the user recovers)
FAULTS = [
    ("write:.reslab-run@1=kill", KILLED, "rerun"),  # the very first write of a new run
    ("write:config.json@1=kill", KILLED, "rerun"),
    ("write:tokenizer.reslab.json@1=kill", KILLED, "resume"),  # config written, nothing trained: resume starts over
    ("append:metrics.jsonl@1=kill", KILLED, "resume"),  # half a line of the first record on disk
    ("append:metrics.jsonl@4=kill", KILLED, "resume"),
    ("write:checkpoint.safetensors@1=kill", KILLED, "resume"),  # no checkpoint yet: resume starts over
    ("write:checkpoint.safetensors@3=kill", KILLED, "resume"),
    ("write:state.json@2=kill", KILLED, "resume"),  # the checkpoint is renamed, its readable copy is not
    ("write:summary.json@1=kill", KILLED, "resume"),  # everything trained, the summary not yet written
    ("step@7=kill", KILLED, "resume"),  # gradients computed, weights not updated
    ("eval@2=kill", KILLED, "resume"),
    ("checkpoint@4=kill", KILLED, "resume"),
    ("step@7=sigint", INTERRUPTED, "resume"),  # Ctrl-C during a step
    ("eval@2=sigint", INTERRUPTED, "resume"),  # Ctrl-C during an evaluation
    ("write:checkpoint.safetensors@2=sigint", INTERRUPTED, "resume"),  # Ctrl-C during a checkpoint write
    ("write:checkpoint.safetensors@2=enospc", 2, "resume"),  # the disk fills up while a checkpoint is written
    ("append:metrics.jsonl@3=enospc", 2, "resume"),
]


def recover(cli, how: str, run, corpus) -> None:
    if how == "rerun":
        code, _, err = cli("train", *RUN, "--data", corpus, "--out", run)
    else:
        code, _, err = cli("train", "--resume", run, "--no-progress")
    assert code == 0, err


@pytest.mark.parametrize("fault, exit_code, how", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_then_recovery_matches_the_uninterrupted_run(cli, fault_corpus, reference, tmp_path, fault, exit_code,
                                                           how):
    run = tmp_path / "run"
    faulted = reslab_process(["train", *RUN, "--data", fault_corpus, "--out", run], env={"RESLAB_FAILPOINTS": fault})
    assert faulted.returncode == exit_code, faulted.stderr
    assert "Traceback" not in faulted.stderr
    if exit_code in (2, INTERRUPTED):  # the process ended itself: one line, and no temp file left behind
        assert stray_temp_files(run) == []
    if exit_code == 2:  # a full disk: the line names the file being written, not a temp file
        one_line_error(2, faulted.stderr)
        assert fault.split(":")[1].split("@")[0] in faulted.stderr and ".tmp" not in faulted.stderr
    if exit_code == INTERRUPTED:
        assert "--resume" in faulted.stderr
        state = json.loads((run / "state.json").read_text())  # stopped at the end of a step, checkpointed there
        assert metrics(run)[-1]["step"] <= state["step"]
    recover(cli, how, run, fault_corpus)
    assert metrics(run) == reference["metrics"]
    assert final(run) == reference["final"]
    assert stray_temp_files(run) == []


def test_a_fault_during_recovery_is_recovered_too(cli, fault_corpus, reference, tmp_path):
    """Killed in a step, then killed again while the resume rewrites metrics.jsonl: the third try still matches."""
    run = tmp_path / "run"
    assert reslab_process(["train", *RUN, "--data", fault_corpus, "--out", run],
                          env={"RESLAB_FAILPOINTS": "step@13=kill"}).returncode == KILLED
    again = reslab_process(["train", "--resume", run], env={"RESLAB_FAILPOINTS": "write:metrics.jsonl@1=kill"})
    assert again.returncode == KILLED
    recover(cli, "resume", run, fault_corpus)
    assert metrics(run) == reference["metrics"] and final(run) == reference["final"]


def test_file_size_limit_is_one_line_and_the_run_recovers(cli, fault_corpus, reference, tmp_path):
    """A real disk limit (RLIMIT_FSIZE, what `ulimit -f` sets): the checkpoint cannot be written."""
    run = tmp_path / "run"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # noqa: E731
    limited = reslab_process(["train", *RUN, "--data", fault_corpus, "--out", run], preexec_fn=limit)
    one_line_error(limited.returncode, limited.stderr)
    assert "limit" in limited.stderr and "checkpoint.safetensors" in limited.stderr and ".tmp" not in limited.stderr
    assert stray_temp_files(run) == []
    recover(cli, "resume", run, fault_corpus)
    assert metrics(run) == reference["metrics"] and final(run) == reference["final"]


def test_non_finite_weights_are_never_checkpointed(cli, fault_corpus, tmp_path):
    """A learning rate that overflows the update makes the weights inf while the step's loss (computed before the
    update) is still finite: the guard must look at the weights, not only the loss."""
    run = tmp_path / "run"
    code, _, err = cli("train", *RUN, "--data", fault_corpus, "--out", run, "--lr", "1e39", "--warmup", "0",
                       "--checkpoint-interval", "1")
    one_line_error(code, err)
    assert "non-finite" in err
    if (run / "checkpoint.safetensors").exists():
        assert all(t.isfinite().all() for t in load_file(run / "checkpoint.safetensors").values())
