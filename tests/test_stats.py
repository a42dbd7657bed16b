"""Statistics over seeds (reslab.stats, the ablation summary): checked against statsmodels, which reslab does not use,
and against planted differences whose detection rate the stated power predicts."""

import json
import math
import random

import pytest
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import DescrStatsW

from reslab.ablation_summary import summarize
from reslab.stats import ALPHA, POWER, adjust, compare, holm, interval, seeds_needed

# final val losses of 5 seeds, recorded from `reslab ablate --model tiny` runs (pre / post / none)
PRE = [3.2065, 3.2035, 3.2217, 3.1990, 3.2141]
POST = [3.3633, 3.3425, 3.3412, 3.3520, 3.3391]
NONE = [3.4127, 3.4075, 3.4215, 3.4101, 3.4188]


@pytest.mark.parametrize("values", [PRE, POST, NONE, [1.0, 2.5], [0.3, 0.1, 0.7, 0.2]])
def test_interval_equals_statsmodels(values):
    ours = interval(values)
    theirs = DescrStatsW(values)
    low, high = theirs.tconfint_mean(alpha=0.05)
    assert ours.mean == pytest.approx(theirs.mean, rel=1e-12)
    assert ours.std == pytest.approx(theirs.std_mean * math.sqrt(len(values)), rel=1e-12)
    assert (ours.low, ours.high) == (pytest.approx(low, rel=1e-10), pytest.approx(high, rel=1e-10))


def test_interval_of_too_few_values_has_no_bounds():
    assert interval([]).n == 0 and interval([]).mean is None
    one = interval([3.0, float("nan"), None])
    assert (one.n, one.mean, one.low, one.high) == (1, 3.0, None, None)


@pytest.mark.parametrize("scheme", [POST, NONE, [v + 0.001 * (i % 3) for i, v in enumerate(PRE)]])
def test_paired_comparison_equals_statsmodels(scheme):
    ours = compare(dict(enumerate(scheme)), dict(enumerate(PRE)))
    diffs = DescrStatsW([a - b for a, b in zip(scheme, PRE)])
    t, p, _ = diffs.ttest_mean(0.0)
    low, high = diffs.tconfint_mean(alpha=0.05)
    assert ours.n == 5 and ours.diff == pytest.approx(diffs.mean, rel=1e-12)
    assert ours.p == pytest.approx(p, rel=1e-8)
    assert (ours.low, ours.high) == (pytest.approx(low, rel=1e-9, abs=1e-12), pytest.approx(high, rel=1e-9, abs=1e-12))


def test_pairs_are_by_seed_and_skip_missing_or_non_finite_values():
    ours = compare({0: 1.0, 1: 2.0, 2: float("nan"), 3: 5.0}, {1: 1.5, 0: 0.9, 2: 1.0, 4: 1.0})
    assert ours.n == 2 and ours.diff == pytest.approx(((1.0 - 0.9) + (2.0 - 1.5)) / 2)


def test_holm_equals_statsmodels():
    pvalues = [0.01, 0.04, 0.03, 0.005, 0.2, 0.04]
    _, theirs, _, _ = multipletests(pvalues, alpha=ALPHA, method="holm")
    assert holm(pvalues) == pytest.approx(list(theirs), rel=1e-12)
    assert holm([0.01, None, 0.02]) == [pytest.approx(0.02), None, pytest.approx(0.02)]


@pytest.mark.parametrize("diffs", [[0.05, 0.02, 0.04, 0.01, 0.03], [0.2, -0.1, 0.15, 0.05], [1.0, 1.1, 0.9],
                                   [0.01, -0.012, 0.003, 0.002], [0.3, 0.1, 0.6]])
def test_seeds_needed_equals_statsmodels_power_solver(diffs):
    mean = sum(diffs) / len(diffs)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    theirs = TTestPower().solve_power(effect_size=abs(mean) / std, alpha=ALPHA, power=POWER,
                                      alternative="two-sided")
    assert seeds_needed(diffs) == max(2, math.ceil(theirs - 1e-9))


def _verdicts(shift: float, seeds: int, schemes: int, rng: random.Random) -> list[str]:
    """One synthetic grid: `schemes` schemes, each `shift` above the baseline, with seed-to-seed noise that pairing
    removes in part (a shared per-seed offset) and noise of its own (sd 1)."""
    offsets = [rng.gauss(0, 2) for _ in range(seeds)]
    base = {s: offsets[s] + rng.gauss(0, 1) for s in range(seeds)}
    tests = [compare({s: offsets[s] + shift + rng.gauss(0, 1) for s in range(seeds)}, base)
             for _ in range(schemes)]
    return [t.verdict for t in adjust(tests)]


def test_a_planted_difference_is_found_at_the_stated_power():
    """A difference of effect size 1.5 (sd of the paired difference sqrt 2): statsmodels' power of one paired test
    at n = 8; with one scheme Holm changes nothing, so the detection rate must match it."""
    rng, seeds, shift = random.Random(0), 8, 1.5 * math.sqrt(2)
    expected = TTestPower().power(effect_size=1.5, nobs=seeds, alpha=ALPHA, alternative="two-sided")
    found = [_verdicts(-shift, seeds, 1, rng)[0] == "better" for _ in range(1000)]
    rate = sum(found) / len(found)
    assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / len(found)), (rate, expected)


def test_a_null_grid_says_better_no_more_often_than_alpha():
    """No difference, 4 schemes against the baseline: Holm keeps the family-wise rate of any "better" or "worse"
    at or below alpha."""
    rng = random.Random(1)
    grids = [_verdicts(0.0, 5, 4, rng) for _ in range(1000)]
    any_claim = sum(any(v in ("better", "worse") for v in grid) for grid in grids) / len(grids)
    assert any_claim <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / len(grids)), any_claim


def _write_run(root, residual, layers, seed, losses, seconds):
    """A finished run directory as `reslab train` leaves it, reduced to what the summary reads."""
    run = root / "runs" / f"{residual}-L{layers}-s{seed}"
    run.mkdir(parents=True)
    (run / ".reslab-run").write_text("{}")
    config = {"reslab_version": "test", "model": "tiny", "model_config": {"residual": residual, "layers": layers},
              "train": {"seed": seed, "steps": 100}, "data": {"sha256": "0"}}
    (run / "config.json").write_text(json.dumps(config))
    records = [{"step": 50 * (i + 1), "val_loss": loss, "train_seconds": t} for i, (loss, t) in
               enumerate(zip(losses, seconds))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"model": "tiny", "residual": residual, "steps": 100, "final_val_loss": losses[-1],
               "best_val_loss": min(losses), "train_seconds": seconds[-1]}
    (run / "summary.json").write_text(json.dumps(summary))


def test_summary_matches_time_and_target_and_compares_with_the_baseline(tmp_path):
    record = {"model": "tiny", "grid": {"residual": ["post", "pre"], "layers": [2], "seeds": [0, 1, 2]},
              "train": {"steps": 100}}
    (tmp_path / "ablation.json").write_text(json.dumps(record))
    for seed in range(3):  # post: slower per step, lower loss per step
        _write_run(tmp_path, "pre", 2, seed, [3.0 + 0.01 * seed, 2.5 + 0.01 * seed], [10.0, 20.0])
        _write_run(tmp_path, "post", 2, seed, [2.9 + 0.02 * seed, 2.4 + 0.01 * seed], [15.0, 30.0])
    result = summarize(tmp_path)
    rows = {r["residual"]: r for r in result["rows"]}
    assert result["baseline"] == "pre" and rows["pre"]["matched_seconds"] == 20.0
    assert rows["post"]["target_loss"] == pytest.approx(2.52)  # the highest final val loss: every run reaches it
    assert rows["pre"]["val_loss_at_matched_time_mean"] == pytest.approx(2.51)  # pre's end, at 20 s
    assert rows["post"]["val_loss_at_matched_time_mean"] == pytest.approx(2.92)  # post's eval at 15 s
    assert rows["post"]["seconds_to_target_mean"] == 30.0 and rows["pre"]["seconds_to_target_mean"] == 20.0
    tests = {c["metric"]: c for c in result["comparisons"]}
    assert tests["final_val_loss"]["diff"] == pytest.approx(-0.1) and tests["final_val_loss"]["verdict"] == "better"
    assert tests["val_loss_at_matched_time"]["diff"] == pytest.approx(0.41)
    assert tests["val_loss_at_matched_time"]["verdict"] == "worse"
    csv_rows = (tmp_path / "comparisons.csv").read_text().splitlines()
    assert csv_rows[0].startswith("residual,layers,baseline,metric,n,diff") and len(csv_rows) == 1 + 4
    assert summarize(tmp_path, baseline="post")["comparisons"][0]["residual"] == "pre"


def test_a_baseline_outside_the_grid_is_one_line(tmp_path, cli):
    record = {"model": "tiny", "grid": {"residual": ["pre", "post"], "layers": [2], "seeds": [0, 1]},
              "train": {"steps": 100}}
    (tmp_path / "ablation.json").write_text(json.dumps(record))
    for seed in range(2):
        _write_run(tmp_path, "pre", 2, seed, [3.0, 2.5 + 0.01 * seed], [10.0, 20.0])
        _write_run(tmp_path, "post", 2, seed, [2.9, 2.4 + 0.02 * seed], [15.0, 30.0])
    code, _, err = cli("report", tmp_path, "--baseline", "hc")
    assert code == 2 and err.strip().count("\n") == 0
    assert "--baseline hc is not a scheme of this grid (pre, post); choose one of them" in err
    assert not (tmp_path / "report.html").exists()
    code, _, err = cli("report", tmp_path, "--baseline", "post", "--target-loss", "2.45")
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["baseline"] == "post" and {r["target_loss"] for r in summary["rows"]} == {2.45}
    html = (tmp_path / "report.html").read_text()
    assert "Against post, paired by seed" in html and "95% interval" in html and "2 seeds" in html


def test_a_seed_without_a_value_withholds_the_verdict(tmp_path):
    """A seed that never reached the target (or was not evaluated by the matched time) is not left out quietly: the
    comparison says how many of the paired seeds it rests on, and gives no verdict."""
    record = {"model": "tiny", "grid": {"residual": ["pre", "post"], "layers": [2], "seeds": [0, 1, 2]},
              "train": {"steps": 100}}
    (tmp_path / "ablation.json").write_text(json.dumps(record))
    for seed in range(3):
        _write_run(tmp_path, "pre", 2, seed, [3.0, 2.40 + 0.01 * seed], [10.0, 20.0])
        _write_run(tmp_path, "post", 2, seed, [2.9, 2.30 + 0.01 * seed], [15.0, 30.0])
    tests = {c["metric"]: c for c in summarize(tmp_path, target_loss=2.405)["comparisons"]}
    assert tests["seconds_to_target"]["n"] == 1 and tests["seconds_to_target"]["paired"] == 3
    assert tests["seconds_to_target"]["verdict"] == "only 1 of 3 seeds measured"
    assert tests["final_val_loss"]["verdict"] == "better"
