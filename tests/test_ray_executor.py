"""`reslab ablate --executor ray`: the same ablation directory and summary as the local executor."""

import csv
import sys

import pytest

from reslab.ablate.grid import GridPoint
from reslab.ablation_summary import TIMING_COLUMNS as TIMING  # wall-clock numbers differ between any two grids

GRID = ["--model", "tiny", "--width", "16", "--heads", "2", "--context", "16", "--batch", "8", "--eval-batches", "2",
        "--steps", "20", "--eval-interval", "10", "--residual", "pre,post", "--layers", "1", "--seeds", "0",
        "--no-report"]


def summary_rows(path) -> list[dict]:
    with open(path) as handle:
        return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in csv.DictReader(handle)]


def test_ray_executor_gives_the_local_summary(cli, corpus, tmp_path):
    ray = pytest.importorskip("ray")
    code, _, err = cli("ablate", *GRID, "--data", corpus, "--jobs", "1", "--out", tmp_path / "local")
    assert code == 0, err
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # a local Ray instance for this test
    try:
        code, _, err = cli("ablate", *GRID, "--data", corpus, "--executor", "ray", "--out", tmp_path / "ray")
        assert code == 0, err
        assert "as Ray tasks" in err
    finally:
        ray.shutdown()
    local, on_ray = summary_rows(tmp_path / "local" / "summary.csv"), summary_rows(tmp_path / "ray" / "summary.csv")
    assert len(local) == 2 and local == on_ray
    for point in ("pre-L1-s0", "post-L1-s0"):
        assert (tmp_path / "ray" / "runs" / point / "checkpoint.safetensors").exists()
    # Re-running finds every point done: nothing is trained, and no Ray runtime is needed for that
    code, _, err = cli("ablate", *GRID, "--data", corpus, "--executor", "ray", "--out", tmp_path / "ray")
    assert code == 0 and "2 already done, 0 to train" in err, err


def test_a_node_without_the_ablation_directory_sends_the_run_back(corpus, tmp_path):
    """A task on a machine that cannot see --out trains in scratch and returns the files (no Ray needed here)."""
    from reslab.ablate.ray_executor import _train_point, _write_run_dir

    train = {"data": str(corpus), "steps": 3, "batch": 4, "eval_batches": 1, "eval_interval": 3}
    model = {"width": 16, "heads": 2, "context": 16}
    run_dir = tmp_path / "elsewhere" / "runs" / "pre-L1-s0"
    result = _train_point(GridPoint("pre", 1, 0), "tiny", model, train, str(run_dir), 1, 123.0, None)
    assert not run_dir.exists() and result["summary"]["steps"] == 3
    assert {"config.json", "checkpoint.safetensors", "metrics.jsonl", "summary.json"} <= set(result["files"])
    _write_run_dir(tmp_path / "back", result["files"])
    assert (tmp_path / "back" / "checkpoint.safetensors").read_bytes() == result["files"]["checkpoint.safetensors"]


def test_ray_flags_without_ray_are_one_line(cli, corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code, _, err = cli("ablate", *GRID, "--data", corpus, "--executor", "ray", "--out", tmp_path / "a")
    assert code == 2 and 'pip install "reslab[ray]"' in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli("ablate", *GRID, "--data", corpus, "--ray-address", "x:6379", "--out", tmp_path / "a")
    assert code == 2 and "--executor ray" in err, err
    assert not (tmp_path / "a").exists()
