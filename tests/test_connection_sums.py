"""The row and column sums of H_res and the sums of H_pre and H_post (issue 27 item 4), in mHC's notation
x' = H_res x + H_post^T F(H_pre x) (arXiv 2512.24880): each site's weights averaged over the tokens of the probed
forward, summarised over the sites (`reslab.metrics`, figure `connection_sums`).

Checked against transformers' DeepSeek-V4 mHC module (code reslab did not write), against weights set by hand for
every multi-stream scheme, over ranks (two half batches give the whole batch's figures), through `reslab train` for
every multi-stream scheme (mhc keeps the sums at 1, hc leaves them as it trains) and through `reslab ablate`'s
report, which draws the figure only when some run logged the sums."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import reslab
from reslab.metrics import in_figure
from reslab.probe import StreamProbe
from reslab.residual import SiteSpec, get_scheme

SUMS = {m.name for m in in_figure("connection_sums")}
WIDTH = 32
SMALL = {"layers": 2, "width": WIDTH, "heads": 2, "vocab_size": 11}
MULTI_STREAM = ["hc", "mhc", "mhc-v4", "mhc-lite", "frac", "gated-hc", "altup"]


def test_the_figure_declares_the_five_sums():
    assert SUMS == {"h_res_row_sum_dev", "h_res_col_sum_dev", "h_res_sum_mean", "h_pre_sum_mean", "h_post_sum_mean"}
    assert all(m.tensorboard and not m.plot.expected for m in in_figure("connection_sums"))


def probed(model: nn.Module, idx: torch.Tensor, ranks=None) -> dict[str, float]:
    """The scheme's metrics after one probed forward, as the trainer logs them on a log step."""
    with StreamProbe().attached(model), torch.no_grad():
        model(idx)
    sites = [site for _, _, site in model.residual_sites()]
    return type(sites[0]).scheme_metrics(sites, ranks)


# --- against transformers' DeepseekV4HyperConnection ---------------------------------------------------------------

class Recorder:
    """A probe for a site called alone: the scheme keeps its weights only on probed forwards."""

    def record(self, site, x, fx, out) -> None:
        pass


def v4_connection(iterations: int) -> nn.Module:
    """transformers' DeepseekV4HyperConnection for 4 streams of WIDTH, weights drawn far from uniform."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v4 import modeling_deepseek_v4

    config = transformers.DeepseekV4Config(
        vocab_size=64, hidden_size=WIDTH, moe_intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        head_dim=16, q_lora_rank=16, o_lora_rank=16, o_groups=1, n_routed_experts=4, num_experts_per_tok=2,
        index_n_heads=2, index_head_dim=8, index_topk=4, sliding_window=8, hc_mult=4, hc_sinkhorn_iters=iterations,
        hc_eps=1e-5, rms_norm_eps=1e-5)
    connection = modeling_deepseek_v4.DeepseekV4HyperConnection(config)
    torch.manual_seed(0)
    with torch.no_grad():
        connection.fn.normal_(0.0, 0.2)
        connection.base.normal_(0.0, 1.0)
        connection.scale.copy_(torch.tensor([1.3, 0.7, 1.5]))
    return connection


@pytest.mark.parametrize("iterations", [2, 20])
def test_mhc_v4_sums_match_transformers_weights(iterations):
    """transformers returns (post, comb, the collapsed read) and mixes `comb^T H`: H_res = comb^T, so H_res's rows
    are comb's columns. H_pre is recovered from the collapsed read by least squares over the 4 distinct streams."""
    from reslab.interop.convert_mhc_v4 import from_reference_streams, load_mhc_v4_site
    from reslab.nn import make_norm

    connection = v4_connection(iterations)
    spec = SiteSpec(0, 0, 1, WIDTH, make_norm("rmsnorm"), {"mhc_v4_sinkhorn_iters": iterations})
    site = get_scheme("mhc-v4")(spec)
    load_mhc_v4_site(site, connection)
    streams = torch.randn(3, 7, 4, WIDTH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        post, comb, collapsed = connection(streams)
        pre = torch.linalg.lstsq(streams.transpose(-1, -2).double(), collapsed.double().unsqueeze(-1)).solution
        site.probe = Recorder()
        site(from_reference_streams(streams), nn.Linear(WIDTH, WIDTH))
    mean_comb = comb.double().mean((0, 1))  # [j, k]: input j, output k
    rows, cols = mean_comb.sum(0), mean_comb.sum(1)
    expected = {"h_res_row_sum_dev": (rows - 1).abs().max(), "h_res_col_sum_dev": (cols - 1).abs().max(),
                "h_res_sum_mean": rows.mean(), "h_pre_sum_mean": pre.sum((-2, -1)).mean(),
                "h_post_sum_mean": post.double().sum(-1).mean()}
    got = type(site).scheme_metrics([site])
    for key, value in expected.items():
        assert got[key] == pytest.approx(value.item(), abs=2e-5), key
    assert got["h_res_row_sum_dev"] < 1e-4  # V4's last step normalises the output streams' weights
    if iterations == 2:  # ... and the inputs' only in the limit: not yet after 2 iterations
        assert got["h_res_col_sum_dev"] > 1e-2
    assert abs(got["h_pre_sum_mean"] - 2.0) > 0.05 and abs(got["h_post_sum_mean"] - 4.0) > 0.05  # not at V4's init


# --- weights set by hand --------------------------------------------------------------------------------------------

def set_hc(site, n):
    """H_res = I + 0.1 (row 0 all ones): rows 1 + 0.4 and 1, every column 1.1; H_pre 0.5 each; H_post 0.25 each."""
    bump = torch.zeros(n, n)
    bump[0] = 0.1
    site.stream_mix.copy_((torch.eye(n) + bump).flatten())
    site.read.fill_(0.5)
    site.write.fill_(0.25)


def set_frac(site, n):
    """Every skip path x 1.5: rows and columns 1.5; the read and write as at init (1 per fraction, n)."""
    site.alpha[..., 1:] *= 1.5


def set_gated_hc(site, n):
    """Gate projections 0: G = sigmoid(0) = 1/2 everywhere (H_pre sum 1/2), b = 2 sigmoid(0) = 1 (H_post n)."""
    site.read.mix_up.zero_()
    site.read.inject.zero_()


def set_altup(site, n):
    """Coefficients 0: C = 0 (H_res = I, H_pre = row 0 of I) and c = 1 (H_post n)."""
    if site.altup is not None:
        site.altup.prediction_coefs.weight.zero_()
        site.altup.correction_coefs.weight.zero_()


@pytest.mark.parametrize("scheme, options, set_weights, expected", [
    ("hc", {}, set_hc, {"h_res_row_sum_dev": 0.4, "h_res_col_sum_dev": 0.1, "h_res_sum_mean": 1.1,
                        "h_pre_sum_mean": 2.0, "h_post_sum_mean": 1.0}),
    ("frac", {"frac_streams": 2, "frac_dynamic": False}, set_frac,
     {"h_res_row_sum_dev": 0.5, "h_res_col_sum_dev": 0.5, "h_res_sum_mean": 1.5, "h_pre_sum_mean": 1.0,
      "h_post_sum_mean": 2.0}),
    ("gated-hc", {}, set_gated_hc, {"h_res_row_sum_dev": 0.0, "h_res_col_sum_dev": 0.0, "h_res_sum_mean": 1.0,
                                    "h_pre_sum_mean": 0.5, "h_post_sum_mean": 4.0}),
    ("altup", {}, set_altup, {"h_res_row_sum_dev": 0.0, "h_res_col_sum_dev": 0.0, "h_res_sum_mean": 1.0,
                              "h_pre_sum_mean": 1.0, "h_post_sum_mean": 4.0}),
])
def test_weights_set_by_hand_give_their_sums(scheme, options, set_weights, expected):
    model = reslab.build_model("gpt", residual=scheme, residual_options=options, **SMALL)
    with torch.no_grad():
        for _, _, site in model.residual_sites():
            set_weights(site, 4 if scheme != "frac" else 2 * 4)
    got = probed(model, torch.randint(0, 11, (2, 8)))
    assert set(got) >= SUMS
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_sinkhorn_keeps_mhc_at_one_where_the_same_logits_move_hc():
    """The same perturbation of the stream-mix parameters: mhc projects its logits onto the doubly-stochastic
    matrices (every sum stays 1), hc uses them as they are."""
    torch.manual_seed(0)
    bump = torch.randn(4, 4)
    hc = reslab.build_model("gpt", residual="hc", **SMALL)
    mhc = reslab.build_model("gpt", residual="mhc", **SMALL)
    with torch.no_grad():
        for _, _, site in hc.residual_sites():
            site.stream_mix.add_(0.3 * bump.flatten())
        for _, _, site in mhc.residual_sites():
            site.mix_bias.add_(3 * bump.flatten())
    idx = torch.randint(0, 11, (2, 8))
    moved, kept = probed(hc, idx), probed(mhc, idx)
    assert moved["h_res_row_sum_dev"] > 0.1 and moved["h_res_col_sum_dev"] > 0.1
    assert kept["h_res_row_sum_dev"] < 1e-5 and kept["h_res_col_sum_dev"] < 1e-5
    assert kept["h_res_sum_mean"] == pytest.approx(1.0, abs=1e-6)
    mixes = [site.last_stream_mix for _, _, site in mhc.residual_sites()]
    assert all((mix - torch.eye(4)).abs().amax() > 0.1 for mix in mixes)  # not the identity: the check means something


# --- over ranks -----------------------------------------------------------------------------------------------------

class OneRank:
    """Rank 1 of two: records what it is asked to reduce (its own figures)."""

    def __init__(self):
        self.seen: dict[str, torch.Tensor] = {}

    def max(self, tensor):
        self.seen["max"] = tensor
        return tensor

    def mean(self, tensor):
        self.seen["mean"] = tensor
        return tensor


class TwoRanks:
    """Rank 0 of two: reduces its figures with rank 1's, as `reslab.train.distributed.World` does."""

    def __init__(self, other: OneRank):
        self.other = other.seen

    def max(self, tensor):
        return torch.maximum(tensor, self.other["max"])

    def mean(self, tensor):
        return (tensor + self.other["mean"]) / 2


@pytest.mark.parametrize("scheme, options", [("mhc", {}), ("hc", {"hc_dynamic": True}), ("altup", {})])
def test_two_half_batches_reduce_to_the_whole_batch(scheme, options):
    """Each rank holds an equal share of the batch: the sums are averaged over ranks before they are summarised,
    so two halves give what one process logs for the whole batch."""
    torch.manual_seed(0)
    model = reslab.build_model("gpt", residual=scheme, residual_options=options, **SMALL).eval()
    with torch.no_grad():  # per-token weights that differ between the tokens
        for name, parameter in model.named_parameters():
            if any(part in name for part in ("dynamic_proj", "gates", "dynamic_scale", "coefs", "router")):
                parameter.normal_(0.0, 0.5)
    idx = torch.randint(0, 11, (4, 8))
    whole = probed(model, idx)
    rank1 = OneRank()
    probed(model, idx[2:], rank1)
    halves = probed(model, idx[:2], TwoRanks(rank1))
    alone = probed(model, idx[:2])
    assert set(halves) == set(whole) >= SUMS
    for key in SUMS:
        assert halves[key] == pytest.approx(whole[key], abs=1e-6), key
    assert any(abs(alone[key] - whole[key]) > 1e-4 for key in SUMS)  # one half alone falls short


# --- through the CLI ------------------------------------------------------------------------------------------------

TINY = ["--model", "gpt", "--width", "32", "--heads", "2", "--context", "16", "--batch", "4",
        "--eval-batches", "1", "--eval-interval", "100", "--dtype", "fp32", "--device", "cpu", "--no-progress"]


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("scheme", MULTI_STREAM)
def test_train_logs_the_sums_of_every_multi_stream_scheme(cli, corpus, tmp_path, scheme):
    """4 steps at a high learning rate, a record every 2: every scheme logs all five; the constrained mixes keep
    their rows and columns at 1 as they train, hc's leave it."""
    run = tmp_path / scheme
    code, _, err = cli("train", *TINY, "--layers", "2", "--residual", scheme, "--steps", "4", "--log-interval", "2",
                       "--lr", "1e-2", "--warmup", "1", "--data", corpus, "--out", run)
    assert code == 0, err
    logged = [r for r in records(run) if "stream_rms" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for record in logged:
        assert SUMS <= set(record), SUMS - set(record)
        assert all(isinstance(record[k], float) and record[k] == record[k] for k in SUMS)
        assert record["h_pre_sum_mean"] > 0 and record["h_post_sum_mean"] > 0
    last = logged[-1]
    if scheme in ("mhc", "mhc-lite", "gated-hc"):  # doubly stochastic, or no mix at all
        assert last["h_res_row_sum_dev"] < 1e-4 and last["h_res_col_sum_dev"] < 1e-4
    if scheme == "mhc-v4":  # rows exactly (the last normalisation), columns to within Sinkhorn's error
        assert last["h_res_row_sum_dev"] < 1e-4
    if scheme == "hc":
        assert last["h_res_row_sum_dev"] > 1e-2 and last["h_res_col_sum_dev"] > 1e-2


def test_the_ablation_report_draws_the_sums_only_when_logged(cli, corpus, tmp_path):
    out = tmp_path / "ablation"
    code, _, err = cli("ablate", *TINY, "--residual", "hc", "--layers", "1", "--seeds", "0", "--jobs", "1",
                       "--steps", "2", "--log-interval", "1", "--lr", "1e-2", "--warmup", "1", "--data", corpus,
                       "--out", out)
    assert code == 0, err
    plot = out / "plots" / "connection_sums.png"
    report = (out / "report.html").read_text()
    assert plot.stat().st_size > 10_000 and 'id="plot-connection_sums"' in report

    run = out / "runs" / "hc-L1-s0"  # the same ablation, had no run logged the sums
    kept = [{k: v for k, v in r.items() if k not in SUMS} for r in records(run)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    code, _, err = cli("report", out)
    assert code == 0, err
    report = (out / "report.html").read_text()
    assert not plot.exists() and "connection_sums" not in report  # not drawn, and not named as missing
    assert (out / "plots" / "amax.png").exists()
