"""`reslab reproduce mix-ln` and `reslab reproduce depth-transfer` in their quick modes: each trains its grid(s),
prints a verdict whose numbers are the runs' own (read back from summary.json and metrics.jsonl), and the
depth-transfer one sweeps one ablation directory per learning rate and draws the sweep."""

import json

import pytest


QUICK_NOTE = "(quick mode: too short to be conclusive; run without --quick)"


def run_file(ablation, scheme: str, depth: int, name: str, seed: int = 0):
    return ablation / "runs" / f"{scheme}-L{depth}-s{seed}" / name


def summary_loss(ablation, scheme: str, depth: int) -> float:
    return json.loads(run_file(ablation, scheme, depth, "summary.json").read_text())["final_val_loss"]


def test_mix_ln_reports_each_schemes_loss_and_deep_gradients_from_its_runs(reproduce):
    code, result, out = reproduce("mix-ln")
    assert code == 0 and result["verdict"].endswith(QUICK_NOTE)
    table = result["numbers"]["schemes"]
    assert list(table) == ["post", "pre", "mix-ln"]
    for scheme, row in table.items():  # one seed: each mean is that run's own number
        assert row["final_val_loss"] == pytest.approx(summary_loss(out, scheme, 4))
        records = [json.loads(line) for line in run_file(out, scheme, 4, "metrics.jsonl").read_text().splitlines()]
        norms = [r["block_grad_norms"] for r in records if r.get("block_grad_norms")]
        assert norms and all(len(n) == 4 for n in norms)
        deep = sum((n[2] + n[3]) / 2 for n in norms) / len(norms)  # the deeper half of 4 blocks
        share = sum((n[2] + n[3]) / 2 / (sum(n) / 4) for n in norms) / len(norms)
        assert row["deep_grad_norm"] == pytest.approx(deep)
        assert row["early_grad_norm"] == pytest.approx(sum(n[0] for n in norms) / len(norms))
        assert row["deep_grad_share"] == pytest.approx(share)
    numbers = result["numbers"]
    assert numbers["deep_share_vs_pre"]["diff"] == pytest.approx(
        table["mix-ln"]["deep_grad_share"] - table["pre"]["deep_grad_share"])
    assert numbers["loss_vs_pre"]["diff"] == pytest.approx(
        summary_loss(out, "mix-ln", 4) - summary_loss(out, "pre", 4))
    assert numbers["loss_vs_pre"]["low"] is None and result["agrees"] is False  # one seed: no interval, no claim
    assert f"mix-ln val loss {table['mix-ln']['final_val_loss']:.3f}" in result["verdict"]


def test_mix_ln_trains_a_model_with_post_ln_in_its_first_quarter_of_blocks(reproduce):
    import reslab

    _, _, out = reproduce("mix-ln")
    config = json.loads(run_file(out, "mix-ln", 4, "config.json").read_text())["model_config"]
    assert config["residual"] == "mix-ln" and config["layers"] == 4
    model = reslab.build_model("gpt", **config)
    kinds = [site.extra_repr().rsplit("here ", 1)[-1] for block in model.blocks
             for site in (block.attn_residual, block.ffn_residual)]
    assert kinds == ["post-LN"] * 2 + ["pre-LN"] * 6  # floor(0.25 x 4) = 1 post-LN block


def test_depth_transfer_sweeps_one_ablation_per_rate_and_picks_the_best_rate_per_depth(reproduce):
    code, result, out = reproduce("depth-transfer")
    assert code == 0 and result["verdict"].endswith(QUICK_NOTE)
    final, best = result["numbers"]["final_val_loss"], result["numbers"]["best_lr"]
    assert list(final) == ["completep", "pre"]
    for scheme, per_depth in final.items():
        assert list(per_depth) == ["L2", "L4"]
        for depth, by_lr in per_depth.items():
            assert list(by_lr) == ["0.003", "0.01"]
            for lr, value in by_lr.items():  # the grid's own numbers, one ablation directory per rate
                assert value == pytest.approx(summary_loss(out / scheme / f"lr-{lr}", scheme, int(depth[1:])))
            assert best[scheme][depth] == float(min(by_lr, key=by_lr.get))
    same = {scheme: best[scheme]["L2"] == best[scheme]["L4"] for scheme in best}
    assert result["agrees"] is (same["completep"] and not same["pre"])
    assert f"completep: L2 best lr {best['completep']['L2']:g}" in result["verdict"]


def test_depth_transfer_tunes_completep_at_depth_2_and_trains_each_rate(reproduce):
    _, _, out = reproduce("depth-transfer")
    for lr in ("0.003", "0.01"):
        config = json.loads(run_file(out / "completep" / f"lr-{lr}", "completep", 4, "config.json").read_text())
        assert config["model_config"]["residual_options"] == {"completep_base_layers": 2}
        assert config["train"]["lr"] == float(lr)
        pre = json.loads(run_file(out / "pre" / f"lr-{lr}", "pre", 2, "config.json").read_text())
        assert pre["model_config"]["residual_options"] == {} and pre["train"]["lr"] == float(lr)


def test_depth_transfer_draws_loss_against_rate(reproduce):
    _, result, out = reproduce("depth-transfer")
    plot = out / "plots" / "depth_transfer.png"
    assert result["numbers"]["plot"] == str(plot)
    data = plot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000
    assert not [p for p in plot.parent.iterdir() if p.name != "depth_transfer.png"]  # no temp file left behind
