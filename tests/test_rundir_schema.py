"""The run directory's schema is written in one place (`reslab.rundir`): training writes only the metric keys it
declares, under every kind of scheme (plain, multi-stream, depth attention)."""

import json

import pytest

from reslab.rundir import METRIC_KEYS, TIMING_KEYS


@pytest.mark.parametrize("residual", ["pre", "mhc", "attnres"])
def test_training_writes_only_declared_metric_keys(cli, corpus, tmp_path, residual):
    run = tmp_path / residual
    code, _, err = cli("train", "--model", "gpt", "--layers", "2", "--width", "32", "--heads", "2", "--context", "16",
                       "--batch", "4", "--steps", "4", "--log-interval", "2", "--eval-interval", "3",
                       "--eval-batches", "1", "--residual", residual, "--data", corpus, "--out", run, "--no-progress")
    assert code == 0, err
    keys = set()
    for line in (run / "metrics.jsonl").read_text().splitlines():
        keys |= set(json.loads(line))
    assert keys <= set(METRIC_KEYS), keys - set(METRIC_KEYS)
    assert {"step", "loss", "val_loss", "stream_rms"} <= keys and set(TIMING_KEYS) <= keys


def test_one_metrics_reader_with_one_damage_policy(tmp_path):
    from reslab.rundir import DamagedRunError, read_metrics

    path = tmp_path / "metrics.jsonl"
    whole = '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    path.write_text(whole + '{"step": 3, "lo')  # a last line cut off by a kill: dropped
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')  # damage elsewhere: one error naming file and line
    with pytest.raises(DamagedRunError, match=r"metrics.jsonl line 2 is not JSON"):
        read_metrics(path)
    path.write_text(whole + "not json\n")  # a whole last line is not what a kill leaves
    with pytest.raises(DamagedRunError, match="line 3"):
        read_metrics(path)
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_each_record_is_one_whole_line_in_one_write(tmp_path, monkeypatch):
    import os

    from reslab.rundir import RunDir

    run = RunDir(tmp_path)
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(data) or real_write(fd, data))
    metrics = run.open_metrics()
    big = {"step": 1, "grad_norms": {f"blocks.{i}.weight": 0.5 for i in range(2000)}}  # beyond any buffer
    metrics.write(big)
    metrics.write({"step": 2})
    metrics.close()
    assert [json.loads(data) for data in writes] == [big, {"step": 2}] and all(w.endswith(b"\n") for w in writes)


@pytest.mark.parametrize("name", [("pre", 2, 0), ("post-none", 12, -3), ("hc-L2-s1", 1, 7)])
def test_the_run_name_is_built_and_parsed_in_one_place(name):
    from reslab.ablationdir import parse_run_name, run_name

    assert tuple(parse_run_name(run_name(*name))) == name
    assert parse_run_name("my-notes") is None


def test_overwrite_removes_an_old_runs_tokenizer_but_never_a_users_tokenizer_json(tmp_path):
    """tokenizer.json was reslab's name before tokenizer.reslab.json: `--overwrite` removes it only when it is in
    reslab's format and the run has no file of the new name; a Hugging Face tokenizer.json the user put there stays."""
    import json

    from reslab.rundir import OLD_TOKENIZER, TOKENIZER, RunDir

    new = tmp_path / "new"
    new.mkdir()
    (new / TOKENIZER).write_text(json.dumps({"kind": "char", "chars": "ab"}))
    (new / OLD_TOKENIZER).write_text(json.dumps({"kind": "char", "version": "1.0", "added_tokens": []}))
    RunDir(new).clear()
    assert not (new / TOKENIZER).exists() and (new / OLD_TOKENIZER).exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / OLD_TOKENIZER).write_text(json.dumps({"kind": "char", "chars": "ab"}))
    RunDir(old).clear()
    assert not (old / OLD_TOKENIZER).exists()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / OLD_TOKENIZER).write_text(json.dumps({"version": "1.0", "added_tokens": [], "model": {}}))
    RunDir(hf).clear()
    assert (hf / OLD_TOKENIZER).exists()
