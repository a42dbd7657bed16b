"""The two reproductions of connections across depth, in their quick modes: each trains its grid, prints a verdict
whose numbers are the grid's own (read back from the runs), and the DenseFormer one draws the learned matrix."""

import json

import pytest

from reslab.reproduce.speedrun_ladder import LADDER


def run_losses(out, scheme: str, depth: int, seed: int = 0) -> float:
    return json.loads((out / "runs" / f"{scheme}-L{depth}-s{seed}" / "summary.json").read_text())["final_val_loss"]


def test_the_speedrun_ladder_adds_one_step_per_rung_and_reports_each(reproduce):
    code, result, out = reproduce("speedrun-ladder")
    assert code == 0 and result["verdict"].endswith("(quick mode: too short to be conclusive; run without --quick)")
    final = result["numbers"]["final_val_loss"]
    assert list(final) == [*LADDER, "value-residual"]
    for scheme, value in final.items():  # one seed in quick mode: the mean is that run's own loss
        assert value == pytest.approx(run_losses(out, scheme, 4))
    steps = result["numbers"]["steps"]
    assert [s["step"] for s in steps] == ["value-embed", "scales", "x0", "long-skip"]
    for step, lower, upper in zip(steps, LADDER, LADDER[1:]):
        assert step["diff"] == pytest.approx(run_losses(out, upper, 4) - run_losses(out, lower, 4))
    assert result["numbers"]["vs_pre"]["diff"] == pytest.approx(final[LADDER[-1]] - final["pre"])
    assert result["agrees"] is False  # one seed: no interval, so no claim can be confirmed
    helped = [s["step"] for s in steps if s["diff"] < 0]
    assert result["verdict"].count(f"steps that lowered the mean loss here: {', '.join(helped) or 'none'}") == 1


def test_denseformer_depth_compares_with_pre_at_l_and_1_5_l_and_draws_the_weights(reproduce):
    code, result, out = reproduce("denseformer-depth")
    assert code == 0
    final = result["numbers"]["final_val_loss"]
    assert set(final) == {"pre-L2", "pre-L3", "denseformer-L2", "denseformer-L3"}
    same = result["numbers"]["vs_pre_same_depth"]
    assert same["diff"] == pytest.approx(run_losses(out, "denseformer", 2) - run_losses(out, "pre", 2))
    assert (out / "plots" / "denseformer_weights.png").stat().st_size > 1000
    assert result["agrees"] is False  # one seed in quick mode: no interval
    assert "depth-weight matrix drawn to" in result["verdict"]
