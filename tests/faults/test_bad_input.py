"""Bad input to every command, and damaged run directories: exit code 2, one line on stderr naming the problem and
the fix, no traceback, and no file changed, whatever the command is."""

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from faults.helpers import RUN, one_line_error, tree

# (arguments, a phrase the error line must contain). RUN_DIR, CORPUS, FIFO, LOOP, FILE, HF_DIR, DIR and NEW are
# replaced by paths the test makes.
TRAIN = ["train", *RUN, "--data", "CORPUS", "--out", "NEW"]
BAD_FLAGS = [
    ([*TRAIN, "--lr", "nan"], "--lr must be a finite number > 0"),
    ([*TRAIN, "--lr", "inf"], "--lr must be a finite number > 0"),
    ([*TRAIN, "--lr", "-1"], "--lr must be"),
    ([*TRAIN, "--weight-decay", "nan"], "--weight-decay must be"),
    ([*TRAIN, "--min-lr", "-0.05"], "--min-lr must be"),
    ([*TRAIN, "--beta1", "1.5"], "--beta1 must be a finite number >= 0 and < 1"),
    ([*TRAIN, "--beta2", "-0.1"], "--beta2 must be"),
    ([*TRAIN, "--grad-clip", "nan"], "--grad-clip must be"),
    ([*TRAIN, "--optimizer", "muon", "--muon-lr", "inf"], "--muon-lr must be"),
    ([*TRAIN, "--warmup", "-1"], "--warmup must be"),
    ([*TRAIN, "--seed", "-1"], "--seed must be"),
    ([*TRAIN, "--dist-timeout", "nan"], "--dist-timeout must be"),
    ([*TRAIN, "--dropout", "1.5"], "dropout must be"),
    ([*TRAIN, "--dropout", "nan"], "dropout must be"),
    ([*TRAIN, "--rope-theta", "0", "--model", "llama"], "rope_theta must be"),
    ([*TRAIN, "--device", "cudafoo"], "unknown device 'cudafoo'"),
    ([*TRAIN, "--residual", "layerscale", "--layerscale-init", "nan"], "layerscale_init must be a finite number"),
    # connections across depth: a block that does not exist, options out of range, compositions that cannot be built
    ([*TRAIN, "--layers", "4", "--residual", "long-skip", "--long-skip-from", "9"], "long_skip_from must be"),
    ([*TRAIN, "--layers", "4", "--residual", "unet", "--unet-init", "nan"], "unet_init must be a finite number"),
    ([*TRAIN, "--layers", "4", "--residual", "backout", "--backout-from", "4"], "backout_from"),
    ([*TRAIN, "--layers", "4", "--residual", "denseformer", "--denseformer-period", "9"], "denseformer_period"),
    ([*TRAIN, "--layers", "4", "--residual", "pre+x0+x0"], "names connection 'x0' twice"),
    ([*TRAIN, "--layers", "4", "--residual", "hc+x0"], "compose with single-stream schemes"),
    ([*TRAIN, "--layers", "4", "--residual", "mudd", "--mudd-streams", "qk"], "mudd_streams"),
    ([*TRAIN, "--layers", "4", "--residual", "pre", "--x0-init", "0.5"], "--x0-init"),
    (["train", "--resume", "RUN_DIR", "--recipe", "fast"], "--recipe applies to new runs"),
    ([*TRAIN, "--device", "mps"], "--device mps"),
    ([*TRAIN, "--device", "cuda:7"], "--device cuda:7"),
    ([*TRAIN, "--tokenizer", "bpe", "--vocab-size", "1"], "--vocab-size must be"),
    ([*TRAIN, "--width", "65536", "--heads", "64", "--layers", "96"], "will not fit"),
    (["train", *RUN, "--data", "FIFO", "--out", "NEW"], "not a regular file"),
    (["train", *RUN, "--data", "LOOP", "--out", "NEW"], "--data"),
    (["train", *RUN, "--data", "DIR", "--out", "NEW"], "is a directory"),
    (["train", *RUN, "--data", "CORPUS", "--out", "FILE"], "is a file"),
    (["train", *RUN, "--data", "CORPUS", "--out", "FILE/sub"], "is a file"),
    (["train", *RUN, "--data", "CORPUS", "--out", "HF_DIR", "--overwrite"], "not a reslab run directory"),
    (["train", "--resume", "RUN_DIR", "--steps", "10"], "below the 24 steps"),
    (["train", "--resume", "RUN_DIR", "--lr", "0.5"], "differs from the run's"),
    (["train", "--resume", "DIR"], "no config.json"),
    (["train", "--resume", "FILE"], "not a directory"),
    (["train", "--resume", "RUN_DIR", "--overwrite"], "contradict"),
    (["sample", "RUN_DIR", "--samples", "0"], "--samples must be"),
    (["sample", "RUN_DIR", "--temperature", "nan"], "--temperature must be"),
    (["sample", "RUN_DIR", "--temperature", "-1"], "--temperature must be"),
    (["sample", "RUN_DIR", "--top-k", "-5"], "--top-k must be"),
    (["sample", "RUN_DIR", "--top-k", "0"], "--top-k must be"),
    (["sample", "RUN_DIR", "--top-p", "0"], "--top-p must be"),
    (["sample", "RUN_DIR", "--top-p", "1.5"], "--top-p must be"),
    (["sample", "RUN_DIR", "--tokens", "0"], "--tokens must be"),
    (["sample", "RUN_DIR", "--device", "cudafoo"], "unknown device"),
    (["sample", "DIR"], "not a reslab run directory"),
    (["sample", "HF_DIR"], "the Hugging Face weights lack"),
    (["ablate", "--steps", "5", "--data", "CORPUS", "--out", "NEW", "--lr", "nan"], "--lr must be"),
    (["ablate", "--steps", "5", "--data", "CORPUS", "--out", "NEW", "--seeds", "a,b"], "--seeds"),
    (["ablate", "--steps", "5", "--data", "CORPUS", "--out", "NEW", "--residual", "pre,nope"], "unknown"),
    (["ablate", "--steps", "5", "--data", "CORPUS", "--out", "FILE"], "FILE"),
    (["ablate", "--steps", "5", "--data", "CORPUS", "--out", "NEW", "--layers", ""],
     "--layers was given an empty value"),
    (["info", "--model", "gpt", "--width", "65536", "--heads", "64", "--layers", "2000"], "will not fit"),
    (["info", "--model", "gpt", "--dropout", "inf"], "dropout must be"),
    (["audit", "gpt", "--set", "layers=abc"], "layers must be an integer"),
    (["audit", "gpt", "--set", "layers=null"], "layers must be an integer"),
    (["audit", "gpt", "--set", "layers=64.0"], "layers must be an integer"),
    (["audit", "gpt", "--set", "dropout=nan"], "dropout must be"),
    (["audit", "gpt", "--expect", "DIR"], "directory"),
    (["audit", "gpt", "--write-expect", "DIR"], "directory"),
    (["audit", "gpt", "--expect", "FILE"], "FILE"),
    (["audit", "DIR"], "DIR"),
    (["audit", "SYNTAX:f"], "SyntaxError"),
    (["audit", "os.path:join"], "missing 1 required positional argument"),
    (["audit", "gpt", "--expect", "LIST"], "an expected audit is a JSON object"),
    (["diagram", "gpt", "-o", "DIR"], "diagram format"),
    (["diagram", "gpt", "-o", "FILE/out.svg"], "FILE"),
    (["diagram", "gpt", "-o", "NEW/out.gif"], "gif"),
    (["report", "NEW"], "does not exist"),
    (["diagram", "gpt", "-o", ""], "-o was given an empty value"),
    (["audit", "gpt", "--write-design", ""], "--write-design was given an empty value"),
    (["audit", "gpt", "--design="], "--design was given an empty value"),
    (["lens", "tiny", "--plot", ""], "--plot was given an empty value"),
    (["audit", "hf:clip"], "cannot build hf:clip"),
    (["audit", "hf:llama", "--set", "num_hiden_layers=2"], "has no field 'num_hiden_layers'"),
    (["report", "FILE"], "is a file"),
    (["report", "RUN_DIR"], "not an ablation directory"),
    # a 0 given is refused, not replaced by the default (it used to prepare with 512 and run on all cores)
    (["data", "prepare", "CORPUS", "--tokenizer", "bpe", "--vocab-size", "0", "--out", "NEW"],
     "--vocab-size must be positive"),
    (["bench", "--model", "tiny", "--threads", "0"], "--threads must be positive"),
]


@pytest.fixture
def places(tmp_path, fault_corpus, reference):
    """The paths the table names, in a fresh directory: a finished run, a FIFO, a symlink loop, a plain file, a
    Hugging Face model directory (config.json + weights, not reslab's) and an empty directory."""
    run = tmp_path / "run"
    shutil.copytree(reference["dir"], run)
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    (tmp_path / "file.txt").write_text("a user's file\n")
    hf = tmp_path / "hf-model"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    save_file({"wte.weight": torch.zeros(4, 4)}, hf / "model.safetensors")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.py").write_text("def f(:\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    return {"SYNTAX": tmp_path / "broken.py", "LIST": tmp_path / "list.json", "RUN_DIR": run, "CORPUS": fault_corpus,
            "FIFO": tmp_path / "fifo", "LOOP": tmp_path / "loop", "FILE": tmp_path / "file.txt", "HF_DIR": hf,
            "DIR": tmp_path / "empty", "NEW": tmp_path / "new"}


def substitute(args: list, places: dict) -> list[str]:
    out = []
    for arg in args:
        for name in sorted(places, key=len, reverse=True):
            arg = arg.replace(name, str(places[name])) if name in arg else arg
        out.append(arg)
    return out


@pytest.mark.parametrize("args, phrase", BAD_FLAGS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_FLAGS])
def test_bad_input_is_one_line_and_changes_nothing(cli, places, tmp_path, monkeypatch, args, phrase):
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    code, _, err = cli(*substitute(args, places))
    one_line_error(code, err)
    assert substitute([phrase], places)[0] in err, err
    assert tree(tmp_path) == before


# -- damaged run directories ----------------------------------------------------------------------------------

def resave(path, change) -> None:
    """Rewrite a checkpoint with `change(tensors)` applied, keeping its metadata (a damaged but well-formed file)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def first(prefix: str, tensors: dict, suffix: str = "") -> str:
    return next(k for k in sorted(tensors) if k.startswith(prefix) and k.endswith(suffix))


def edit_header_dtype(path) -> None:
    data = bytearray(path.read_bytes())
    length = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + length].decode()
    data[8:8 + length] = header.replace('"F32"', '"I32"', 1).encode()  # same width: only the type lies
    path.write_bytes(bytes(data))


DAMAGE = {
    "config.json not JSON": lambda run: (run / "config.json").write_text('{"model": "tiny", '),
    "config.json {}": lambda run: (run / "config.json").write_text("{}"),
    "config.json a list": lambda run: (run / "config.json").write_text("[1, 2]"),
    "checkpoint truncated": lambda run: (run / "checkpoint.safetensors").write_bytes(
        (run / "checkpoint.safetensors").read_bytes()[:3000]),
    "checkpoint random bytes": lambda run: (run / "checkpoint.safetensors").write_bytes(os.urandom(4096)),
    "checkpoint is a pickle": lambda run: torch.save({"w": torch.zeros(2)}, run / "checkpoint.safetensors"),
    "header dtype edited": lambda run: edit_header_dtype(run / "checkpoint.safetensors"),
    "RNG state wrong size": lambda run: resave(run / "checkpoint.safetensors",
                                               lambda t: t.update({"rng.torch": t["rng.torch"][:100].clone()})),
    "model tensor int8": lambda run: resave(run / "checkpoint.safetensors", lambda t: t.update(
        {first("model.", t): t[first("model.", t)].to(torch.int8)})),
    "optimizer moment wrong shape": lambda run: resave(run / "checkpoint.safetensors", lambda t: t.update(
        {first("optimizer.", t, "exp_avg"): torch.zeros(3, 5)})),
    "optimizer moment missing": lambda run: resave(run / "checkpoint.safetensors",
                                                   lambda t: t.pop(first("optimizer.", t, "exp_avg"))),
    "optimizer state missing": lambda run: resave(run / "checkpoint.safetensors", lambda t: [
        t.pop(k) for k in [k for k in t if k.startswith("optimizer.")]]),
    "optimizer groups edited": lambda run: edit_meta(run, lambda m: m["optimizer"].update(param_groups=[{}, {}])),
    "RNG state not a generator's": lambda run: resave(run / "checkpoint.safetensors", lambda t: t.update(
        {"rng.batch": torch.zeros_like(t["rng.batch"])})),
    "training state edited": lambda run: edit_meta(run, lambda m: m["state"].update(best_val_loss="x")),
    "weights not finite": lambda run: resave(run / "checkpoint.safetensors", lambda t: t[first("model.", t)].fill_(
        float("nan"))),
    "checkpoint missing after training": lambda run: (run / "checkpoint.safetensors").unlink(),
    "checkpoint a directory": lambda run: [(run / "checkpoint.safetensors").unlink(),
                                           (run / "checkpoint.safetensors").mkdir()],
    "config data record": lambda run: edit_config(run, lambda c: c.update(data={})),
    "config model field missing": lambda run: edit_config(run, lambda c: c["model_config"].pop("context")),
}


def edit_meta(run, change) -> None:
    """Rewrite the training metadata inside the checkpoint (as a hand edit of its JSON would)."""
    path = run / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    meta = json.loads(metadata["meta"])
    change(meta)
    save_file(load_file(path), path, metadata={**metadata, "meta": json.dumps(meta)})


def edit_config(run, change) -> None:
    config = json.loads((run / "config.json").read_text())
    change(config)
    (run / "config.json").write_text(json.dumps(config))


TRAINING_STATE_ONLY = ("RNG state wrong size", "optimizer moment wrong shape", "optimizer moment missing",
                       "optimizer state missing", "optimizer groups edited", "RNG state not a generator's",
                       "training state edited", "config data record")  # `sample` reads only the weights


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("command", ["resume", "sample"])
def test_damaged_run_is_one_line_and_left_as_it_is(cli, places, damage, command):
    if command == "sample" and damage in TRAINING_STATE_ONLY:
        DAMAGE[damage](places["RUN_DIR"])
        assert cli("sample", places["RUN_DIR"], "--tokens", "5")[0] == 0
        return
    run = places["RUN_DIR"]
    DAMAGE[damage](run)
    before = tree(run)
    args = ["train", "--resume", run, "--steps", "30"] if command == "resume" else ["sample", run, "--tokens", "5"]
    code, _, err = cli(*args)
    one_line_error(code, err)
    assert "checkpoint" in err or "config.json" in err
    assert tree(run) == before


def test_a_cut_off_last_metrics_line_is_dropped_on_resume(cli, places, reference):
    run = places["RUN_DIR"]
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + text.splitlines()[-1][:25])  # what a kill mid-append leaves
    code, _, err = cli("train", "--resume", run, "--steps", "28", "--no-progress")
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 28


def test_a_header_length_ending_in_0x80_is_a_safetensors_file_not_a_pickle(cli, places):
    """The bug that refused about one checkpoint in eight: 0x80 as the first byte is a pickle's opcode, but here it
    is the low byte of the safetensors header length."""
    run = places["RUN_DIR"]
    path = run / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    for pad in range(400):
        save_file(tensors, path, metadata={**metadata, "pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    code, out, err = cli("sample", run, "--tokens", "5")
    assert code == 0 and out, err
    code, _, err = cli("train", "--resume", run, "--steps", "26", "--no-progress")
    assert code == 0, err


def test_overwrite_replaces_reslab_files_and_keeps_the_users(cli, places):
    run = places["RUN_DIR"]
    (run / "notes.md").write_text("my notes on this run")
    code, _, err = cli("train", *RUN, "--data", places["CORPUS"], "--out", run, "--overwrite", "--steps", "4")
    assert code == 0, err
    assert (run / "notes.md").read_text() == "my notes on this run"
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


def test_resume_refuses_a_directory_reslab_did_not_write(cli, places, tmp_path):
    """A user's directory whose config.json happens to have reslab's keys is still not a run to write into."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    config = json.loads((places["RUN_DIR"] / "config.json").read_text())
    del config["reslab_version"]
    (theirs / "config.json").write_text(json.dumps(config))
    (theirs / "metrics.jsonl").write_text("their own log\n")
    before = tree(theirs)
    code, _, err = cli("train", "--resume", theirs, "--no-progress")
    one_line_error(code, err)
    assert "not a reslab run directory" in err and tree(theirs) == before


def test_overwrite_keeps_the_users_files_in_tensorboard(cli, places):
    run = places["RUN_DIR"]
    (run / "tensorboard").mkdir(exist_ok=True)
    (run / "tensorboard" / "my_notes.txt").write_text("precious")
    code, _, err = cli("train", *RUN, "--data", places["CORPUS"], "--out", run, "--overwrite", "--steps", "2")
    assert code == 0, err
    assert (run / "tensorboard" / "my_notes.txt").read_text() == "precious"


def test_a_moved_corpus_resumes_with_data_pointing_to_it(cli, places, tmp_path):
    run = places["RUN_DIR"]
    moved = tmp_path / "moved.txt"
    moved.write_bytes(places["CORPUS"].read_bytes())
    config = json.loads((run / "config.json").read_text())
    config["train"]["data"] = str(tmp_path / "gone.txt")
    (run / "config.json").write_text(json.dumps(config))
    code, _, err = cli("train", "--resume", run, "--steps", "26", "--no-progress")
    one_line_error(code, err)
    assert "--data NEW_PATH" in err
    code, _, err = cli("train", "--resume", run, "--steps", "26", "--no-progress", "--data", moved)
    assert code == 0, err
    other = tmp_path / "other.txt"
    other.write_text("different text " * 2000)
    code, _, err = cli("train", "--resume", run, "--steps", "28", "--no-progress", "--data", other)
    one_line_error(code, err)
    assert "changed since" in err


def test_an_ablation_that_failed_on_its_input_accepts_the_corrected_command(cli, places, tmp_path):
    out = tmp_path / "grid"
    grid = ["ablate", "--model", "tiny", "--width", "16", "--heads", "2", "--context", "16", "--batch", "4",
            "--residual", "pre", "--layers", "1", "--seeds", "0", "--steps", "2", "--eval-batches", "1",
            "--no-report", "--jobs", "1", "--out", out]
    code, _, err = cli(*grid, "--data", tmp_path / "missing.txt")
    one_line_error(code, err)
    code, _, err = cli(*grid, "--data", places["CORPUS"])
    assert code == 0, err
    (out / "runs" / "pre-L1-s0" / "summary.json").write_text("{oops")
    code, _, err = cli(*grid, "--data", places["CORPUS"])
    one_line_error(code, err)
    assert "summary.json" in err


def test_report_is_built_from_the_runs_on_disk_not_a_stale_summary(cli, places, tmp_path):
    out = tmp_path / "grid"
    grid = ["ablate", "--model", "tiny", "--width", "16", "--heads", "2", "--context", "16", "--batch", "4",
            "--residual", "pre,none", "--layers", "1", "--seeds", "0", "--steps", "2", "--eval-batches", "1",
            "--no-report", "--jobs", "1", "--data", places["CORPUS"], "--out", out]
    assert cli(*grid)[0] == 0
    shutil.rmtree(out / "runs" / "none-L1-s0")
    code, _, err = cli("report", out)
    assert code == 0, err
    assert [row["residual"] for row in json.loads((out / "summary.json").read_text())["rows"]] == ["pre"]
    (out / "runs" / "pre-L1-s0" / "config.json").write_text("{oops")
    code, _, err = cli("report", out)
    one_line_error(code, err)
    assert "config.json" in err


DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON on which Python's json recurses until RecursionError
RESUME = ["train", "--resume", "RUN_DIR", "--steps", "30", "--no-progress"]
# file of the run directory -> the commands that read it
DEEP_READERS = {
    "config.json": [RESUME, ["sample", "RUN_DIR", "--tokens", "5"], ["lens", "RUN_DIR", "--tokens", "8"],
                    ["audit", "RUN_DIR"], ["report", "ABLATION"]],
    "metrics.jsonl": [RESUME, ["report", "ABLATION"]],
    "summary.json": [["report", "ABLATION"]],
    "ablation.json": [["report", "ABLATION"]],
}


def in_an_ablation(run, out) -> None:
    """Make `out` an ablation directory (as `reslab ablate` writes it) whose one grid point is the run `run`."""
    (out / "runs").mkdir(parents=True)
    shutil.copytree(run, out / "runs" / "post-L1-s0")
    (out / "ablation.json").write_text(json.dumps({"model": "tiny", "grid": {"residual": ["post"], "layers": [1],
                                                   "seeds": [1337]}, "train": {"steps": 24}}))


@pytest.mark.parametrize("name, args", [(name, args) for name, readers in DEEP_READERS.items() for args in readers],
                         ids=lambda value: value if isinstance(value, str) else value[0])
def test_json_nested_100000_deep_is_one_line_naming_the_file(cli, places, tmp_path, name, args):
    ablation = tmp_path / "ablation"
    in_an_ablation(places["RUN_DIR"], ablation)
    run = ablation / "runs" / "post-L1-s0" if "ABLATION" in args else places["RUN_DIR"]
    path = ablation / name if name == "ablation.json" else run / name
    if name == "metrics.jsonl":  # a whole last line, not one a kill cut off: never dropped as one
        path.write_text(path.read_text() + DEEP + "\n")
    else:
        path.write_text(DEEP)
    before = tree(tmp_path)
    code, _, err = cli(*substitute(args, {**places, "ABLATION": ablation}))
    one_line_error(code, err)
    assert f"{path}" in err and "100000 levels deep" in err
    assert tree(tmp_path) == before
