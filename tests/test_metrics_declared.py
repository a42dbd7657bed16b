"""Adding a metric is its computation plus one declaration (`reslab.metrics`): a metric registered at test time, with
nothing else changed, reaches metrics.jsonl, TensorBoard, the run's summary.json, the ablation's summary.json,
its plots and report.html of a real (tiny) `reslab ablate`."""

import json

import pytest

from reslab import metrics
from reslab.metrics import LAST, VALUE, Metric, Plotted, Summary


def weight_rms(model, result) -> float:
    """The computation: RMS of all the model's weights, on log steps."""
    import torch

    with torch.no_grad():
        squares = sum(p.float().pow(2).sum() for p in model.parameters())
        count = sum(p.numel() for p in model.parameters())
    return (squares / count).sqrt().item()


WEIGHT_RMS = Metric("weight_rms", unit="", description="RMS of all the model's weights", source="this test",
                    tensorboard="weights/rms", summaries=(Summary("final_weight_rms", LAST, VALUE, "weight\nRMS", 5),),
                    plot=Plotted("weight_rms", "weight RMS"), compute=weight_rms)


def test_a_declared_metric_reaches_every_output(cli, corpus, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setitem(metrics.METRICS, WEIGHT_RMS.name, WEIGHT_RMS)  # the one declaration
    out = tmp_path / "ablation"
    code, _, err = cli("ablate", "--model", "tiny", "--width", "16", "--heads", "2", "--context", "16", "--batch",
                       "4", "--steps", "10", "--log-interval", "5", "--eval-interval", "10", "--eval-batches", "1",
                       "--residual", "pre", "--layers", "1", "--seeds", "0", "--jobs", "1", "--data", corpus,
                       "--out", out)
    assert code == 0, err
    run = out / "runs" / "pre-L1-s0"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["weight_rms"] for r in records if "weight_rms" in r]
    assert len(logged) == 2 and all(value > 0 for value in logged)  # steps 5 and 10

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [event.value for event in events.Scalars("weights/rms")] == pytest.approx(logged)

    assert json.loads((run / "summary.json").read_text())["final_weight_rms"] == logged[-1]
    row = json.loads((out / "summary.json").read_text())["rows"][0]
    assert row["final_weight_rms_mean"] == logged[-1] and row["final_weight_rms_std"] == 0.0
    assert "final_weight_rms_mean" in (out / "summary.csv").read_text()

    report = (out / "report.html").read_text()
    assert "<th>weight<br>RMS</th>" in report and f"<td>{logged[-1]:.5f}</td>" in report
    assert (out / "plots" / "weight_rms.png").stat().st_size > 0 and 'id="plot-weight_rms"' in report


def test_a_name_is_declared_once():
    with pytest.raises(ValueError, match="already declared"):
        metrics.register(Metric("loss", "", "a second loss", "nowhere"))
