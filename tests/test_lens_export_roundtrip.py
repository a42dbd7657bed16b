"""The lens survives a Hugging Face export (issue 28 item 6, second bullet): a run trained with the CLI, written by
`reslab export RUN --hf DIR` and loaded back with transformers' own AutoModelForCausalLM, is read by the traced lens
(`reslab.lens` on the transformers module: blocks, final norm and head found from its graph, lens/traced.py) to the
same numbers as reslab's own lens on the run (its residual sites), within 1e-5, at every block boundary and at the
output; and `reslab lens DIR` on the command line prints the same JSON numbers as `reslab lens RUN`.

The two lenses differ in granularity: reslab's has an entry per sublayer site ('embed', '0.attn', '0.ffn', ...),
the traced one per block ('embed', '<blocks>.0', ...). The stream leaving block k is the stream after its last
sublayer, so the traced entry k is compared with reslab's '<k>.ffn' (and 'embed' with 'embed')."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_corpus, run_cli

import reslab

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5
LAYERS = 3
TRAIN = ["train", "--layers", str(LAYERS), "--width", "32", "--heads", "2", "--context", "32", "--batch", "8",
         "--steps", "20", "--lr", "0.01", "--warmup", "5", "--eval-batches", "1", "--eval-interval", "20",
         "--log-interval", "20", "--checkpoint-interval", "20", "--no-progress", "--no-diagnostics",
         "--dtype", "fp32", "--residual", "pre"]  # pre: the scheme transformers' GPT-2 and Llama compute
FAMILIES = {"gpt": (["--model", "gpt"], "gpt2", "transformer.h"),
            "llama": (["--model", "llama", "--kv-heads", "1"], "llama", "model.layers")}  # kv-heads 1: GQA
MEANS = ("loss", "entropy", "top_1", "kl")  # LensResult's per-entry means
PER_POSITION = ("loss", "entropy", "agreement", "kl")  # the keys of LensResult.per_position


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (run directory, its Hugging Face export), each run trained 20 steps on a small play-like corpus."""
    root = tmp_path_factory.mktemp("roundtrip")
    corpus = make_corpus(root / "corpus.txt", 20_000)
    pairs = {}
    for family, (flags, _, _) in FAMILIES.items():
        run, folder = root / family, root / f"{family}-hf"
        code, _, err = run_cli(*TRAIN, *flags, "--data", corpus, "--out", run)
        assert code == 0, err
        code, out, err = run_cli("export", run, "--hf", folder)
        assert code == 0 and (folder / "model.safetensors").is_file(), err
        pairs[family] = (run, folder)
    return pairs


def sample_text(run: Path) -> str:
    """Text the run's tokenizer reads: four windows of its context from its own corpus."""
    return (run.parent / "corpus.txt").read_text()[1000:1000 + 4 * 32 + 1]


def boundary_entries(names: list[str]) -> list[int]:
    """Indices of reslab's entries where a block ends: 'embed', then each block's last site."""
    last = {name.split(".")[0]: i for i, name in enumerate(names[1:], start=1)}
    return [0, *last.values()]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_traced_lens_of_the_export_equals_reslabs_lens_of_the_run(exported, family):
    run_dir, folder = exported[family]
    _, model_type, blocks = FAMILIES[family]
    run = reslab.load_run(run_dir)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert hf_model.config.model_type == model_type and not hasattr(hf_model, "stream")  # read traced, not converted
    text = sample_text(run_dir)
    ids = torch.tensor(hf_tokenizer(text)["input_ids"])
    assert ids.tolist() == run.tokenizer.encode(text)  # the exported tokenizer gives the run's ids
    tokens, targets = ids[:-1].view(4, 32), ids[1:].view(4, 32)
    ours = reslab.lens(run.model, tokens, targets, keep_logits=True)
    theirs = reslab.lens(hf_model, tokens, targets, keep_logits=True)
    assert theirs.names == ["embed", *[f"{blocks}.{k}" for k in range(LAYERS)]]
    assert theirs.scheme.endswith("(traced)") and "traced" not in ours.scheme
    assert ours.names == ["embed", *[f"{k}.{site}" for k in range(LAYERS) for site in ("attn", "ffn")]]
    at = boundary_entries(ours.names)
    assert at == [0, 2, 4, 6]
    for metric in MEANS:
        expected = [getattr(ours, metric)[i] for i in at]
        assert getattr(theirs, metric) == pytest.approx(expected, abs=TOLERANCE, rel=0), metric
    for metric in PER_POSITION:
        assert torch.allclose(theirs.per_position[metric], ours.per_position[metric][at], atol=TOLERANCE, rtol=0)
    assert torch.allclose(theirs.logits, ours.logits[at], atol=TOLERANCE, rtol=0)
    with torch.no_grad():  # the output entry is transformers' own logits
        assert torch.allclose(theirs.logits[-1], hf_model(tokens).logits, atol=TOLERANCE, rtol=0)
    # not vacuous: training made the entries differ far beyond the tolerance, so a shifted entry would fail
    steps = (theirs.logits[1:] - theirs.logits[:-1]).flatten(1).abs().amax(1)
    assert steps.min() > 1000 * TOLERANCE and theirs.loss[-1] < theirs.loss[0] - 0.1


def numbers(record, path: str = "") -> dict[str, float]:
    """Every number of a JSON record, keyed by its path ('layers.3.kl')."""
    if isinstance(record, dict):
        return {k: v for key, value in record.items() for k, v in numbers(value, f"{path}.{key}").items()}
    if isinstance(record, list):
        return {k: v for i, value in enumerate(record) for k, v in numbers(value, f"{path}.{i}").items()}
    if isinstance(record, (int, float)) and not isinstance(record, bool):
        return {path: float(record)}
    return {}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reslab_lens_of_the_export_prints_the_runs_numbers(exported, family):
    run_dir, folder = exported[family]
    text = sample_text(run_dir)
    code, out, err = run_cli("lens", run_dir, "--prompt", text, "--json")
    assert code == 0, err
    of_run = json.loads(out)
    code, out, err = run_cli("lens", folder, "--prompt", text, "--json")
    assert code == 0, err
    of_folder = json.loads(out)
    assert of_folder["target"] != of_run["target"] and str(folder) in of_folder["target"]
    assert [layer["name"] for layer in of_folder["layers"]] == [layer["name"] for layer in of_run["layers"]]
    assert of_folder["tokens"] == of_run["tokens"] == 4 * 32
    expected, got = numbers({k: v for k, v in of_run.items() if k != "target"}), numbers(of_folder)
    got.pop(".target", None)
    assert sorted(got) == sorted(expected) and len(expected) > 6 * 4  # every layer's means, and the decomposition
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=TOLERANCE, rel=0), key
