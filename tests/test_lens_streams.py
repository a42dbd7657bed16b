"""The lens per stream on multi-stream schemes: each parallel stream decoded on its own with the model's final norm
and head, and the weight each site reads it with (issue 28, item 4, for reslab's own models)."""

import json

import pytest
import torch

import reslab

MULTI = ["hc", "mhc", "mhc-v4", "mhc-lite", "gated-hc"]


def build(residual: str, perturb: bool = False, **options):
    torch.manual_seed(0)
    model = reslab.build_model("gpt", width=32, heads=2, layers=2, vocab_size=65, context=16, residual=residual,
                               residual_options=options)
    if perturb:  # every connection weight away from its init, so the streams part ways
        with torch.no_grad():
            generator = torch.Generator().manual_seed(1)
            for name, parameter in model.named_parameters():
                if "_residual." in name or name.startswith("stream."):
                    parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("residual", MULTI)
def test_every_stream_is_decoded_at_every_entry(residual):
    result = reslab.lens(build(residual), tokens())
    streams = result.streams
    assert streams is not None and streams.count == 4
    assert all(len(values) == len(result.names) for values in streams.loss + streams.agreement + streams.kl)
    assert all(torch.isfinite(torch.tensor(values)).all() for values in streams.loss)


def test_hc_at_init_carries_copies_so_each_stream_reads_as_the_collapse():
    """Hyper-connections start with an identity mix and every write into every stream: n equal copies, whose sum the
    final LayerNorm reads as one copy. Each stream's lens equals the reduced stream's."""
    result = reslab.lens(build("hc"), tokens())
    assert all(result.streams.loss[k] == result.streams.loss[0] for k in range(4))  # equal copies, bit for bit
    # LayerNorm(4 x) is LayerNorm(x) but for its eps (1e-5 against a 16x larger variance): 1e-4 nats apart
    assert result.streams.loss[0] == pytest.approx(result.loss, abs=5e-4)


def test_streams_part_ways_once_the_connections_move():
    result = reslab.lens(build("hc", perturb=True), tokens())
    last = [result.streams.loss[k][-1] for k in range(4)]
    assert max(last) - min(last) > 1e-3


def test_read_weights_are_the_sites_own_static_reads():
    model = build("hc", perturb=True)
    result = reslab.lens(model, tokens())
    sites = [site for _, _, site in model.residual_sites()]
    for s, site in enumerate(sites):
        assert [result.streams.read[k][s] for k in range(4)] == pytest.approx(site.read.tolist(), abs=1e-6)


def test_one_stream_has_no_per_stream_lens(cli):
    assert reslab.lens(build("pre"), tokens()).streams is None
    code, out, err = cli("lens", "gpt", "--layers", "2", "--width", "32", "--heads", "2", "--tokens", "12", "--json")
    assert code == 0, err and "streams" not in json.loads(out)


def test_cli_prints_and_writes_the_per_stream_lens(cli):
    flags = ["lens", "gpt", "--residual", "mhc", "--layers", "2", "--width", "32", "--heads", "2", "--tokens", "12"]
    code, out, err = cli(*flags, "--json")
    assert code == 0, err
    streams = json.loads(out)["streams"]
    assert streams["count"] == 4 and len(streams["loss"]) == 4 and len(streams["read"][0]) == 4  # 4 sites
    code, out, err = cli(*flags)
    assert code == 0, err
    assert "loss s0" in out and "read s3" in out and "per stream (4 streams)" in out


def test_the_ablation_reports_lens_panel_draws_each_stream(cli, corpus, tmp_path, monkeypatch):
    """A trained mhc run and a pre run: the panel's data has each of mhc's 4 streams beside its collapse (by block,
    the same entries), and none for pre; the report draws it."""
    from reslab.lens import ablation

    code, _, err = cli("ablate", "--model", "gpt", "--residual", "pre,mhc", "--layers", "2", "--seeds", "1",
                       "--width", "32", "--heads", "2", "--context", "16", "--batch", "4", "--steps", "6",
                       "--eval-batches", "1", "--data", corpus, "--out", tmp_path / "abl", "--jobs", "1",
                       "--no-progress", "--no-report")
    assert code == 0, err
    drawn = {}
    real = ablation.draw_curves
    monkeypatch.setattr(ablation, "draw_curves", lambda curves, *rest: (drawn.update(curves), real(curves, *rest)))
    code, _, err = cli("report", tmp_path / "abl")
    assert code == 0, err
    assert (tmp_path / "abl" / "plots" / "lens.png").stat().st_size > 10_000
    pre, mhc = drawn[("pre", 2)], drawn[("mhc", 2)]
    assert pre.streams is None and len(pre.loss) == 3
    assert len(mhc.streams) == 4 and all(len(stream) == len(mhc.loss) == 3 for stream in mhc.streams)
    assert all(stream[0] == pytest.approx(mhc.loss[0], abs=1e-4) for stream in mhc.streams)  # equal copies at first


# --- models read from their traced graph (transformers' own classes) ------------------------------------------------

def hf_target(name: str, **overrides):
    from reslab.graph.targets import Kind, load_target, resolve_target

    torch.manual_seed(0)
    return load_target(resolve_target(name, tuple(Kind), name), overrides, device="cpu").model.eval()


def test_traced_deepseek_v4_decodes_each_of_its_four_streams_by_hand():
    """transformers' DeepSeek-V4 (its default small config: compressed attention, which reslab does not convert, so
    the lens reads the traced graph): stream k of an entry decoded alone is lm_head(norm(H_k)) computed by hand from
    transformers' own stream (its HyperHead of n equal copies is a positive multiple of H_k; the norm drops it)."""
    model = hf_target("hf:deepseek_v4")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    result = reslab.lens(model, ids)
    assert result.scheme.endswith("(traced)") and result.streams is not None and result.streams.count == 4
    kept = []
    model.model.layers[0].register_forward_hook(lambda module, inputs, out: kept.append(out.detach()))
    with torch.no_grad():
        final_logp = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
        for k in range(4):
            logits = model.lm_head(model.model.norm(kept[0][:, :, k]))[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()
            assert result.streams.loss[k][1] == pytest.approx(loss, abs=1e-4)
    assert result.streams.read is None and final_logp.shape[1] == 11


def test_traced_qwen4_exp_reads_its_concatenated_streams():
    """Qwen4-Exp carries its 4 streams side by side, (batch, seq, 4 x hidden_size): four streams, equal copies of the
    embedding at entry 0, apart after a block."""
    model = hf_target("hf:qwen4_exp")
    result = reslab.lens(model, torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(4)))
    streams = result.streams
    assert streams is not None and streams.count == 4
    assert len({round(streams.loss[k][0], 6) for k in range(4)}) == 1
    assert len({round(streams.loss[k][-1], 7) for k in range(4)}) > 1


def test_frac_with_several_streams_is_read_per_stream_without_read_weights(cli):
    """frac's connection weights are per fraction ((alpha, beta), not MultiStreamSite's read/mix/write): the lens
    decodes its streams and leaves the read weights out instead of failing."""
    code, out, err = cli("lens", "gpt", "--residual", "frac", "--frac-streams", "2", "--layers", "2", "--width", "32",
                         "--heads", "2", "--tokens", "12", "--json")
    assert code == 0, err
    streams = json.loads(out)["streams"]
    assert streams["count"] == 2 and streams["read"] is None
