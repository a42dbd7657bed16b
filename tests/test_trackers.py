"""`--log`: TensorBoard gets every metric the report plots, the hyper-parameters with the final metrics, and the config
as text; W&B (offline, read back from its run files) gets the same, one run per grid point grouped by the ablation;
a tracker that is not installed is one line naming the pip command, before anything is written."""

from __future__ import annotations

import json
import struct
import sys

import pytest

from reslab.metrics import declared, tensorboard_scalars

TINY = ("--model", "tiny", "--width", "16", "--heads", "2", "--context", "16", "--batch", "4", "--eval-batches", "1",
        "--dtype", "fp32", "--device", "cpu", "--no-progress")


def records_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_plotted_metric_goes_to_tensorboard():
    assert [m.name for m in declared() if m.plot is not None and m.tensorboard is None] == []
    record = {"step": 5, "update_ratio": [[0.5, 0.25]], "amax_gain_forward": 1.5, "stream_rms": [1.0, 2.0]}
    assert dict(tensorboard_scalars(record)) == {
        "update_ratio/block0/attention": 0.5, "update_ratio/block0/ffn": 0.25, "amax_gain/forward": 1.5,
        "stream_rms/block0": 1.0, "stream_rms/block1": 2.0}


def test_tensorboard_holds_every_plotted_metric_the_hparams_and_the_config(cli, corpus, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tmp_path / "run"
    code, _, err = cli("train", *TINY, "--residual", "hc", "--steps", "6", "--log-interval", "3", "--eval-interval",
                       "6", "--data", corpus, "--out", run, "--log", "tensorboard")
    assert code == 0, err
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    records = records_of(run)
    plotted = {m.name for m in declared() if m.plot is not None}
    assert plotted <= {key for record in records for key in record}  # hc logs every plotted metric, amax included
    for record in records:
        for tag, value in tensorboard_scalars(record):
            assert tag in tags
            assert [e.value for e in events.Scalars(tag) if e.step == record["step"]] == pytest.approx([value])
    assert {"update_ratio/block0/attention", "update_ratio/block0/ffn", "amax_gain/forward", "val_loss"} <= tags

    summary = json.loads((run / "summary.json").read_text())
    assert events.Scalars("final/final_val_loss")[0].value == pytest.approx(summary["final_val_loss"])
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    config = json.loads((run / "config.json").read_text())
    assert start.hparams["train.lr"].number_value == config["train"]["lr"]
    assert start.hparams["model_config.residual"].string_value == "hc"
    assert start.hparams["data.sha256"].string_value == config["data"]["sha256"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.replace("\n    ", "\n"))["model_config"] == config["model_config"]


def wandb_records(path):
    """The records of an offline W&B run file (run-ID.wandb): a LevelDB-style log of protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data, position, parts = path.read_bytes(), 7, b""  # after the header: ":W&B", magic, version
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        parts += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            yield wandb_internal_pb2.Record.FromString(parts)
            parts = b""


def wandb_run(directory) -> dict:
    """config, history (step -> {key: value}), summary, group and name of the one offline run in `directory`."""
    (path,) = directory.glob("run-*.wandb")
    run = {"config": {}, "history": {}, "summary": {}}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(group=record.run.run_group, name=record.run.display_name)
            run["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            run["history"][row["_step"]] = row
        elif kind == "summary":
            run["summary"].update({"/".join(u.nested_key) or u.key: json.loads(u.value_json)
                                   for u in record.summary.update})
    return run


def test_wandb_offline_one_run_per_grid_point_grouped_by_the_ablation(cli, corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = tmp_path / "grid.toml"
    settings.write_text(f'model = "tiny"\n[model_config]\nwidth = 16\nheads = 2\ncontext = 16\n'
                        f'[train]\nsteps = 4\nbatch = 4\nlog_interval = 2\neval_interval = 4\neval_batches = 1\n'
                        f'dtype = "fp32"\ndevice = "cpu"\ndata = "{corpus}"\n'
                        f'[grid]\nresidual = ["pre", "post"]\nlayers = [1]\nseeds = [3]\n')
    out = tmp_path / "abl"
    code, _, err = cli("ablate", "--config", settings, "--log", "wandb", "--jobs", "1", "--no-report", "--out", out)
    assert code == 0, err
    runs = {run["name"]: run for run in map(wandb_run, (tmp_path / "wandb").glob("offline-run-*"))}
    assert set(runs) == {"pre-L1-s3", "post-L1-s3"}
    for name, run in runs.items():
        assert run["group"] == "abl"
        assert run["config"]["model_config.residual"] == name.split("-")[0] and run["config"]["train.seed"] == 3
        assert run["config"]["train.lr"] == 1e-3 and run["config"]["model_config.width"] == 16
        for record in records_of(out / "runs" / name):
            logged = run["history"][record["step"]]
            assert {tag: logged[tag] for tag, _ in tensorboard_scalars(record)} == dict(tensorboard_scalars(record))
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        assert run["summary"]["final/final_val_loss"] == pytest.approx(summary["final_val_loss"])


@pytest.mark.parametrize(("log", "message"), [
    ("wandb", 'pip install "reslab[wandb]" (in a clone: pip install -c constraints.txt -e ".[wandb]")'),
    ("tensorboard,mlflow", "unknown tracker 'mlflow'; choose auto, none, or a comma list of tensorboard, wandb"),
])
def test_a_tracker_not_installed_or_unknown_is_one_line_before_anything_is_written(cli, corpus, tmp_path,
                                                                                   monkeypatch, log, message):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec finds nothing
    for command in ("train", "ablate"):
        out = tmp_path / command
        code, _, err = cli(command, *TINY, "--steps", "2", "--data", corpus, "--out", out, "--log", log)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_log_auto_is_tensorboard_when_installed(monkeypatch):
    from reslab.train.loggers import trackers

    assert trackers("auto") == ["tensorboard"] and trackers("none") == [] and trackers("wandb, wandb") == ["wandb"]
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert trackers("auto") == []
