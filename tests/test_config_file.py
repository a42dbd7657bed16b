"""`--config FILE` (TOML, YAML, JSON): its settings under the flags given; a run's config.json replays that run
exactly; a bad file is one line naming the file and the key, exit 2, with nothing written."""

from __future__ import annotations

import json

import pytest

TINY = ("--model", "tiny", "--width", "16", "--heads", "2", "--context", "16", "--batch", "4", "--eval-batches", "1",
        "--dtype", "fp32", "--device", "cpu", "--no-progress", "--log", "none")


def read(path) -> dict:
    return json.loads(path.read_text())


def test_a_recorded_config_json_replays_the_run_exactly(cli, corpus, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    code, _, err = cli("train", *TINY, "--residual", "sandwich", "--layers", "2", "--lr", "3e-3", "--seed", "7",
                       "--steps", "8", "--log-interval", "4", "--eval-interval", "4", "--data", corpus, "--out", first)
    assert code == 0, err
    code, _, err = cli("train", "--config", first / "config.json", "--out", again)
    assert code == 0, err
    original, replayed = read(first / "config.json"), read(again / "config.json")
    for key in ("model", "model_config", "train", "data"):
        assert replayed[key] == original[key], key
    assert read(again / "summary.json")["final_val_loss"] == read(first / "summary.json")["final_val_loss"]
    losses = [[r.get("loss"), r.get("val_loss")] for r in map(json.loads, (first / "metrics.jsonl").open())]
    assert [[r.get("loss"), r.get("val_loss")] for r in map(json.loads, (again / "metrics.jsonl").open())] == losses


SETTINGS = {
    "toml": 'model = "tiny"\n[model_config]\nwidth = 16\nheads = 2\ncontext = 16\nresidual = "pre"\n'
            '[train]\nsteps = 50\nlr = 0.002\nbatch = 4\neval_batches = 1\ndtype = "fp32"\ndevice = "cpu"\n'
            'log = "none"\n',
    "yaml": "model: tiny\nmodel_config: {width: 16, heads: 2, context: 16, residual: pre}\n"
            "train: {steps: 50, lr: 0.002, batch: 4, eval_batches: 1, dtype: fp32, device: cpu, log: none}\n",
}


@pytest.mark.parametrize("suffix", sorted(SETTINGS))
def test_the_flags_given_override_the_file(cli, corpus, tmp_path, suffix):
    settings = tmp_path / f"settings.{suffix}"
    settings.write_text(SETTINGS[suffix])
    run = tmp_path / "run"
    code, _, err = cli("train", "--config", settings, "--steps", "2", "--eval-interval", "2", "--residual", "post",
                       "--data", corpus, "--out", run, "--no-progress")
    assert code == 0, err
    config = read(run / "config.json")
    assert config["train"]["steps"] == 2 and config["model_config"]["residual"] == "post"  # the flags
    assert config["train"]["lr"] == 0.002 and config["model_config"]["width"] == 16  # the file
    assert config["train"]["log"] == "none" and config["train"]["data"] == str(corpus)


BAD = [
    ("s.toml", "lr = 0.1\n", ("unknown key 'lr' (a training setting: put it under [train]); valid keys: model, "
                              "model_config, train")),
    ("s.toml", "[train]\nlearning_rate = 0.1\n", ("s.toml: train.learning_rate is not one of the training "
                                                  "settings; valid: aux_weights, batch,")),
    ("s.json", '{"model": "tiny", "model_config": {"widht": 16}}', ("s.json: model_config.widht is not one of "
                                                                    "the fields of model 'tiny'; valid: bias,")),
    ("s.toml", '[train]\nsteps = "many"\n', "s.toml: train.steps"),
    ("s.toml", "[train]\nsteps = -3\n", "s.toml: train.steps"),
    ("s.toml", "[train\n", "s.toml is not valid TOML"),
    ("s.yaml", "train: [1, 2\n", "s.yaml is not valid YAML"),
    ("s.json", "[1, 2]", "the settings must be a table of keys"),
    ("s.ini", "[train]\n", "unknown format '.ini'"),
]


@pytest.mark.parametrize(("name", "text", "message"), BAD, ids=[message[:30] for _, _, message in BAD])
def test_a_bad_settings_file_is_one_line_and_nothing_is_written(cli, corpus, tmp_path, name, text, message):
    settings = tmp_path / name
    settings.write_text(text)
    for command in ("train", "ablate"):
        out = tmp_path / command
        code, _, err = cli(command, "--config", settings, "--data", corpus, "--out", out)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_config_with_recipe_resume_or_a_missing_file_is_refused(cli, tmp_path):
    settings = tmp_path / "s.toml"
    settings.write_text("[train]\nsteps = 2\n")
    for args, message in ((("--recipe", "fast"), "--recipe and --config both give the settings"),
                          (("--resume", tmp_path), "--config applies to new runs"),):
        code, _, err = cli("train", "--config", settings, *args)
        assert code == 2 and message in err, err
    code, _, err = cli("train", "--config", tmp_path / "none.toml", "--out", tmp_path / "out")
    assert code == 2 and "no such file" in err and not (tmp_path / "out").exists()
