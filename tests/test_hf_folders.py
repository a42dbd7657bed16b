"""Hugging Face folders are first-class: `save_pretrained` folders of a supported family go through info, audit,
diagram, lens and sample (checked against transformers' own model on the same weights), an unsupported family or a
folder that is neither is one line, and `reslab export` writes runs that transformers loads as they are, with the
same logits and the same token ids."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SHARED_TINYSHAKESPEARE, make_corpus, run_cli

from reslab.graph.targets import WEIGHTED, load_trained, resolve_target

transformers = pytest.importorskip("transformers")

SMALL = {
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 32, "vocab_size": 64},
    "llama": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
              "intermediate_size": 64, "vocab_size": 64, "max_position_embeddings": 32},
    "bert": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "vocab_size": 64},
}
TRAIN = ["train", "--layers", "2", "--width", "32", "--heads", "2", "--context", "16", "--batch", "4", "--steps", "3",
         "--eval-batches", "1", "--eval-interval", "3", "--log-interval", "3", "--checkpoint-interval", "3",
         "--no-progress", "--no-diagnostics", "--dtype", "fp32"]
TEXT = "ROMEO:\nthe king, my lord"  # characters every corpus below has
PROMPT_IDS = [3, 1, 4, 1, 5, 9, 2, 6]


def one_line(code: int, err: str) -> str:
    assert code == 2 and err.count("\n") == 1 and err.startswith("reslab: error: ") and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """save_pretrained folders with random weights from small configs: gpt2, llama (supported) and bert (not)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    for model_type, sizes in SMALL.items():
        config = transformers.AutoConfig.for_model(model_type, **sizes, bos_token_id=None, eos_token_id=None,
                                                   pad_token_id=None)
        auto = transformers.AutoModel if model_type == "bert" else transformers.AutoModelForCausalLM
        auto.from_config(config).save_pretrained(root / model_type)
    return {model_type: root / model_type for model_type in SMALL}


def hf_model(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_a_hf_folder_goes_through_every_command(folders, tmp_path, model_type):
    folder, hf = folders[model_type], hf_model(folders[model_type])
    code, out, err = run_cli("info", folder)
    assert code == 0, err
    assert f"\nparameters: {hf.num_parameters():,}\n" in out  # the converted model is as large as HF's
    code, out, err = run_cli("audit", folder, "--json")
    assert code == 0, err
    assert json.loads(out)["summary"]["residual_count"] == 4  # around attention and FFN in each of 2 blocks
    code, out, err = run_cli("diagram", folder, "-o", tmp_path / "model.svg")
    assert code == 0 and (tmp_path / "model.svg").stat().st_size > 1000, err
    # no tokenizer.json: the prompt is token ids, as the sample prints them
    code, out, err = run_cli("lens", folder, "--prompt", " ".join(map(str, PROMPT_IDS)), "--json")
    assert code == 0, err
    ids = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        logits = hf(ids).logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
    assert json.loads(out)["layers"][-1]["loss"] == pytest.approx(expected, abs=1e-5)  # the lens reads HF's model
    code, out, err = run_cli("sample", folder, "--prompt", "3 1 4", "--tokens", "6", "--temperature", "0")
    assert code == 0, err
    greedy = hf.generate(torch.tensor([[3, 1, 4]]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.split() == [str(i) for i in greedy[0].tolist()]


@pytest.mark.parametrize("command", [["info"], ["audit"], ["diagram", "-o", "x.svg"], ["sample"]])
def test_an_unsupported_family_is_one_line_naming_it(folders, command):
    err = one_line(*run_cli(command[0], folders["bert"], *command[1:])[::2])
    assert "model type 'bert' is not supported" in err and "gpt2, llama" in err


def test_the_lens_reads_an_unsupported_family_from_its_traced_graph(folders):
    """`reslab lens` takes any folder transformers loads as a causal LM (issue 28): BERT's, read traced."""
    code, out, err = run_cli("lens", folders["bert"], "--tokens", "8", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["scheme"].endswith("(traced)") and record["layers"][-1]["kl"] == pytest.approx(0, abs=1e-6)


def test_a_folder_that_is_neither_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden": 3}))
    for command in ("info", "audit", "lens", "sample"):
        err = one_line(*run_cli(command, tmp_path)[::2])
        assert "not a reslab run directory" in err and "nor a Hugging Face folder" in err


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Runs trained 3 steps: a char-level gpt, a BPE llama, and a post-LN gpt (no HF equivalent)."""
    root = tmp_path_factory.mktemp("runs")
    corpus = root / "corpus.txt"
    if SHARED_TINYSHAKESPEARE.exists():
        corpus.write_text(SHARED_TINYSHAKESPEARE.read_text()[:20_000])
    else:
        make_corpus(corpus, 20_000)
    flags = {"char": ["--model", "gpt"], "bpe": ["--model", "llama", "--kv-heads", "1", "--tokenizer", "bpe",
                                                  "--vocab-size", "300"],
             "post": ["--model", "gpt", "--residual", "post", "--steps", "1"]}
    for name, extra in flags.items():
        code, _, err = run_cli(*TRAIN, *extra, "--data", corpus, "--out", root / name)
        assert code == 0, err
    return {name: root / name for name in flags}


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_an_exported_run_loads_in_transformers_with_the_same_logits_and_ids(runs, tmp_path, kind):
    code, out, err = run_cli("export", runs[kind], "--hf", tmp_path / "hf")
    assert code == 0, err
    assert "logits within" in out and (tmp_path / "hf" / "tokenizer.json").is_file()
    ours = load_trained(resolve_target(str(runs[kind]), WEIGHTED))
    model = hf_model(tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == ours.tokenizer.encode(TEXT) and tokenizer.decode(ids) == TEXT
    x = torch.tensor([ids[:16]])
    with torch.no_grad():
        difference = (model(x).logits - ours.model(x).logits).abs().max().item()
    assert difference <= 1e-5
    assert ours.tokenizer.kind == kind
    greedy = ["--prompt", TEXT, "--tokens", "8", "--temperature", "0"]  # the folder, as a target, samples as the run
    assert run_cli("sample", tmp_path / "hf", *greedy)[1] == run_cli("sample", runs[kind], *greedy)[1]


def test_an_exported_char_tokenizer_has_every_id_of_the_run(runs, tmp_path):
    assert run_cli("export", runs["char"], "--hf", tmp_path / "hf")[0] == 0
    ours = load_trained(resolve_target(str(runs["char"]), WEIGHTED)).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    every = ours.decode(list(range(ours.vocab_size)))
    assert theirs(every)["input_ids"] == list(range(ours.vocab_size)) and theirs.decode(range(ours.vocab_size)) == every


def test_a_run_whose_tokenizer_has_the_old_name_still_loads(runs, tmp_path):
    old = tmp_path / "old-run"
    shutil.copytree(runs["char"], old)
    (old / "tokenizer.reslab.json").rename(old / "tokenizer.json")  # as runs written before the rename have it
    sample = ["--prompt", "ROMEO:", "--tokens", "8", "--temperature", "0"]
    code, out, err = run_cli("sample", old, *sample)
    assert code == 0, err
    assert out == run_cli("sample", runs["char"], *sample)[1]
    code, _, err = run_cli("export", old, "--hf", tmp_path / "hf")
    assert code == 0 and (tmp_path / "hf" / "tokenizer.json").is_file(), err


def test_export_never_overwrites_what_it_did_not_write(runs, tmp_path):
    target = tmp_path / "hf"
    assert run_cli("export", runs["char"], "--hf", target)[0] == 0
    written = {path.name: path.read_bytes() for path in target.iterdir()}
    err = one_line(*run_cli("export", runs["bpe"], "--hf", target)[::2])
    assert "not empty" in err and "--overwrite" in err
    assert {path.name: path.read_bytes() for path in target.iterdir()} == written  # untouched
    code, _, err = run_cli("export", runs["bpe"], "--hf", target, "--overwrite")  # an earlier export: replaced
    assert code == 0 and json.loads((target / "config.json").read_text())["model_type"] == "llama", err
    (target / "notes.txt").write_text("a user's file\n")
    err = one_line(*run_cli("export", runs["char"], "--hf", target, "--overwrite")[::2])
    assert "notes.txt" in err and (target / "notes.txt").read_text() == "a user's file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary directory left beside it
    (target / "notes.txt").unlink()
    (target / ".reslab-export").unlink()  # as a save_pretrained folder of the same files: not reslab's to replace
    kept = {path.name: path.read_bytes() for path in target.iterdir()}
    err = one_line(*run_cli("export", runs["char"], "--hf", target, "--overwrite")[::2])
    assert "reslab did not export" in err and {p.name: p.read_bytes() for p in target.iterdir()} == kept


def test_export_refuses_a_run_without_a_hugging_face_equivalent(runs, folders, tmp_path):
    err = one_line(*run_cli("export", runs["post"], "--hf", tmp_path / "hf")[::2])
    assert "residual scheme 'post'" in err and "residual='pre'" in err and not (tmp_path / "hf").exists()
    err = one_line(*run_cli("export", folders["gpt2"], "--hf", tmp_path / "hf")[::2])
    assert "is a Hugging Face folder" in err and "give a run directory" in err


@pytest.mark.parametrize("files, commands, says", [
    ({"config.json": '{"model_type": "llama", "hidden_size": "x"}'}, ("info", "sample"), "'hidden_size'"),
    ({"config.json": '{"model_type": "llama"}', "model.safetensors.index.json": "{bad"}, ("sample",),
     "is not valid JSON"),
    ({"config.json": '{"model_type": "llama"}', "model.safetensors.index.json": '{"weight_map": [1]}'},
     ("sample",), "not a shard index"),
])
def test_a_damaged_hugging_face_folder_is_one_line(tmp_path, files, commands, says):
    """A config field transformers refuses, or a shard index that is not one: one line naming it (the info of a
    folder reads only its config; sample reads its weights too)."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for command in commands:
        err = one_line(*run_cli(command, tmp_path)[::2])
        assert says in err, err
