"""benchmarks/lens_speed.py (issue 28 item 7) runs: its --quick mode times the `reslab lens hf:gpt2` command and a
plain forward of the same model as child processes and reports wall and CPU seconds, peak memory and the issue's
two targets; the full mode's shape is the issue's GPT-2-small shape over 256 tokens."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from conftest import benchmark_json, load_benchmark

ROOT = Path(__file__).resolve().parents[1]
# the issue's shape, written out here so that a benchmark measuring something else fails this test
ISSUE_SHAPE = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("lens_speed")


@pytest.fixture(scope="module")
def quick(bench):
    """One --quick run, every figure as JSON."""
    return benchmark_json(bench, "--quick")


def test_the_full_mode_times_the_issues_command(bench):
    assert bench.SHAPE == ISSUE_SHAPE and bench.TOKENS == 256
    assert bench.TARGET_SECONDS == 10 and bench.TARGET_MEMORY_RATIO == 2
    assert " ".join(bench.lens_command(bench.SHAPE, bench.TOKENS)) == (
        "reslab lens hf:gpt2 --set n_layer=12 --set n_embd=768 --set n_head=12 --set n_positions=1024 "
        "--set vocab_size=50257 --eval-tokens 256")


def test_quick_reports_times_and_memory_of_the_lens_and_the_forward(bench, quick):
    assert quick["quick"] and quick["runs"] == 1 and quick["shape"] == bench.QUICK_SHAPE
    assert quick["command"] == "python -m " + " ".join(bench.lens_command(bench.QUICK_SHAPE, bench.QUICK_TOKENS))
    assert Path(quick["src"]) == ROOT / "src"
    lens, forward = quick["lens"], quick["forward"]
    assert lens["entries"] == bench.QUICK_SHAPE["n_layer"] + 1  # the lens printed embed and one row per block
    for child in (lens, forward):
        for figure in ("wall_s", "cpu_s", "maxrss_mib"):
            assert len(child[figure]) == 1 and child[figure][0] > 0 and child[f"median_{figure}"] == child[figure][0]
        assert child["median_maxrss_mib"] > 100  # both children import torch and transformers: far above 100 MiB
    assert 0 < forward["median_built_rss_mib"] <= forward["median_maxrss_mib"]
    shape = bench.QUICK_SHAPE  # GPT-2's parameters (tied head), fp32
    width, layers, vocab, positions = shape["n_embd"], shape["n_layer"], shape["vocab_size"], shape["n_positions"]
    params = (vocab + positions) * width + layers * (12 * width * width + 13 * width) + 2 * width
    assert forward["median_weights_mib"] == pytest.approx(4 * params / 2**20, abs=1e-3)
    targets = quick["targets"]
    assert targets["memory_ratio"] == pytest.approx(lens["median_maxrss_mib"] / forward["median_maxrss_mib"],
                                                    abs=1e-3)
    assert targets["seconds_met"] == (lens["median_wall_s"] < 10)
    assert targets["memory_met"] == (targets["memory_ratio"] <= 2)
    assert targets["extra_mib"] == pytest.approx(lens["median_maxrss_mib"] - forward["median_maxrss_mib"], abs=0.1)
    assert len(quick["machine"]["load_before"]) == 3 and quick["machine"]["cpus"] >= 1


def test_the_text_report_states_both_targets(bench, quick):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.report(quick)
    text = out.getvalue()
    assert quick["command"] in text
    assert "target: under 10 s wall:" in text and "target: peak memory within 2x the forward's:" in text
    assert f"{quick['lens']['median_wall_s']:.2f}" in text and f"{quick['lens']['median_maxrss_mib']:.0f}" in text


def test_a_src_without_reslab_is_refused(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--quick", "--src", str(tmp_path)])
    assert exit_.value.code == 2 and "holds no reslab package" in capsys.readouterr().err
