"""`reslab ablate`: the grid, its summary, re-runs that skip and resume, diverged points, bad input."""

import csv
import json

import pytest

GRID = ["ablate", "--width", "16", "--heads", "2", "--context", "16", "--batch", "4", "--eval-batches", "2",
        "--eval-interval", "10", "--log-interval", "5", "--steps", "20", "--residual", "pre,none", "--layers", "1",
        "--seeds", "0,1", "--no-report"]


def test_grid_summary_and_rerun(cli, corpus, tmp_path):
    out = tmp_path / "abl"
    code, stdout, err = cli(*GRID, "--data", corpus, "--out", out, "--jobs", "1")
    assert code == 0, err
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        f"{r}-L1-s{s}" for r in ("none", "pre") for s in (0, 1)]
    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["residual"], r["layers"]): r for r in summary["rows"]}
    assert set(rows) == {("pre", 1), ("none", 1)}
    losses = [r["final_val_loss_mean"] for r in summary["rows"]]
    assert losses == sorted(losses)  # best first
    for (residual, layers), row in rows.items():
        seeds = [json.loads((out / "runs" / f"{residual}-L{layers}-s{s}" / "summary.json").read_text())
                 for s in (0, 1)]
        values = [s["final_val_loss"] for s in seeds]
        assert row["seeds"] == 2
        assert row["final_val_loss_mean"] == pytest.approx(sum(values) / 2)
        assert row["final_val_loss_min"] == min(values) and row["final_val_loss_max"] == max(values)
        assert row["final_val_loss_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
        assert row["final_stream_rms_mean"] == pytest.approx(sum(s["final_stream_rms"][-1] for s in seeds) / 2)
        assert row["mean_drift_mean"] is not None and row["tokens_per_second_mean"] > 0
    with open(out / "summary.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["residual"], int(r["layers"])) for r in table] == [(r["residual"], r["layers"]) for r in summary["rows"]]
    assert "final val loss" in stdout and "95% interval" in stdout
    assert "against pre, paired by seed" in stdout and "1 seed" not in err
    assert "2 seed(s) at some grid point" in err  # the few-seeds warning
    assert stdout.index(summary["rows"][0]["residual"]) < stdout.index(summary["rows"][-1]["residual"])

    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/checkpoint.safetensors")}
    code, _, err = cli(*GRID, "--data", corpus, "--out", out, "--jobs", "1")
    assert code == 0 and "4 already done, 0 to train" in err
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/checkpoint.safetensors")} == before

    code, _, err = cli(*[a if a != "20" else "30" for a in GRID], "--data", corpus, "--out", out)
    assert code == 2 and "steps=20, not 30" in err


def test_stopped_grid_resumes_to_the_same_result(cli, corpus, tmp_path):
    args = [*GRID[:GRID.index("--residual")], "--residual", "pre", "--layers", "2", "--seeds", "0", "--no-report",
            "--data", corpus, "--dropout", "0.1"]
    assert cli(*args, "--out", tmp_path / "whole")[0] == 0
    code, _, err = cli(*args, "--out", tmp_path / "split", "--stop-at", "7", "--jobs", "1")
    assert code == 0, err
    state = json.loads((tmp_path / "split" / "runs" / "pre-L2-s0" / "state.json").read_text())
    assert state["step"] == 7 and not (tmp_path / "split" / "runs" / "pre-L2-s0" / "summary.json").exists()
    code, _, err = cli(*args, "--out", tmp_path / "split")
    assert code == 0 and "0 already done, 1 to train" in err
    read = lambda d: json.loads((tmp_path / d / "summary.json").read_text())["rows"][0]  # noqa: E731
    assert read("split")["final_val_loss_mean"] == read("whole")["final_val_loss_mean"]


def test_parallel_jobs_match_serial(cli, corpus, tmp_path):
    args = [*GRID[:GRID.index("--residual")], "--residual", "pre,none", "--layers", "1", "--seeds", "0",
            "--no-report", "--data", corpus]
    assert cli(*args, "--out", tmp_path / "serial", "--jobs", "1")[0] == 0
    code, _, err = cli(*args, "--out", tmp_path / "parallel", "--jobs", "2")
    assert code == 0 and "2 job(s) x" in err
    rows = lambda d: {r["residual"]: r["final_val_loss_mean"]  # noqa: E731
                      for r in json.loads((tmp_path / d / "summary.json").read_text())["rows"]}
    assert rows("serial") == pytest.approx(rows("parallel"), abs=1e-5)


def test_diverged_point_is_recorded_not_fatal(cli, corpus, tmp_path):
    out = tmp_path / "abl"
    code, stdout, err = cli("ablate", "--width", "16", "--heads", "2", "--context", "16", "--batch", "4",
                            "--steps", "6", "--log-interval", "1", "--checkpoint-interval", "1", "--lr", "1e30",
                            "--warmup", "0", "--grad-clip", "0", "--residual", "add", "--layers", "1", "--seeds", "0",
                            "--no-report", "--data", corpus, "--out", out, "--jobs", "1")
    assert code == 0, err
    assert "diverged" in err
    row = json.loads((out / "summary.json").read_text())["rows"][0]
    assert row["diverged"] == 1 and row["seeds"] == 0 and row["final_val_loss_mean"] is None
    assert "diverged" in stdout


@pytest.mark.parametrize("flags, message", [
    (["--residual", "pre,bogus"], "unknown residual scheme 'bogus'"),
    (["--seeds", "0,x"], "--seeds takes a comma list of int values"),
    (["--layers", "2,2"], "--layers repeats a value"),
    (["--layers", "0"], "layers must be positive"),
    (["--jobs", "0"], "--jobs must be positive"),
])
def test_bad_grid_fails_before_training(cli, corpus, tmp_path, flags, message):
    code, _, err = cli("ablate", "--steps", "5", "--data", corpus, "--out", tmp_path / "abl", *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "abl" / "runs").exists()


def test_rerun_accepts_what_train_resume_accepts(cli, corpus, tmp_path):
    """The runtime fields (how a run is carried out) may change when a grid is run again, as on `train --resume`;
    the experiment's fields may not."""
    out = tmp_path / "abl"
    small = [*GRID[:GRID.index("--seeds")], "--seeds", "0", "--no-report", "--residual", "pre", "--data", corpus,
             "--out", out, "--jobs", "1"]
    assert cli(*small)[0] == 0
    runtime = ["--log-interval", "3", "--eval-interval", "7", "--grad-accum", "2", "--eval-batches", "1"]
    code, _, err = cli(*small, *runtime)
    assert code == 0 and "1 already done, 0 to train" in err, err
    code, _, err = cli(*small, "--lr", "0.5")
    assert code == 2 and "lr" in err


@pytest.mark.parametrize("started_in", ["fp32", "bf16"])
def test_rerun_under_dtype_auto_continues_in_the_grids_dtype(cli, corpus, tmp_path, started_in):
    """A grid started with an explicit dtype (or before `--dtype auto` became the default: fp32) and continued with
    the default finishes in the dtype it began in, on any machine: the new points train in it too."""
    import torch

    from reslab.train.step import bf16_supported

    if started_in == "bf16" and not bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU cannot run bf16 at all")
    out = tmp_path / "abl"
    small = [*GRID[:GRID.index("--seeds")], "--residual", "pre", "--no-report", "--data", corpus, "--out", out,
             "--jobs", "1"]
    assert cli(*small, "--seeds", "0", "--dtype", started_in)[0] == 0
    code, _, err = cli(*small, "--seeds", "0,1")  # the default dtype: auto
    assert code == 0, err
    for seed in (0, 1):
        config = json.loads((out / "runs" / f"pre-L1-s{seed}" / "config.json").read_text())
        assert config["train"]["dtype"] == started_in
    code, _, err = cli(*small, "--seeds", "0,1", "--dtype", "fp32" if started_in == "bf16" else "bf16")
    assert code == 2 and "dtype" in err and len(err.strip().splitlines()) == 1


def test_rerun_of_a_grid_recorded_before_dtype_existed_continues_in_fp32(cli, corpus, tmp_path):
    """An ablation.json without a dtype (written before the field existed) is an fp32 grid, not a different one."""
    out = tmp_path / "abl"
    small = [*GRID[:GRID.index("--seeds")], "--residual", "pre", "--no-report", "--data", corpus, "--out", out,
             "--jobs", "1"]
    assert cli(*small, "--seeds", "0", "--dtype", "fp32")[0] == 0
    record = json.loads((out / "ablation.json").read_text())
    del record["train"]["dtype"], record["train"]["dtype_auto"]
    (out / "ablation.json").write_text(json.dumps(record))
    code, _, err = cli(*small, "--seeds", "0,1")
    assert code == 0, err
    assert json.loads((out / "runs" / "pre-L1-s1" / "config.json").read_text())["train"]["dtype"] == "fp32"
