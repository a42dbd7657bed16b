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
