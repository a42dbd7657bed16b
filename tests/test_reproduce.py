"""`reslab reproduce NAME --quick`: each reproduction runs its grid and prints a verdict with the numbers."""

import json

import pytest
from conftest import make_corpus

from reslab.cli import main

KEYS = {"tiny-residual": {"residual", "article_edit", "no_residual"}, "depth": {"none", "pre"},
        "post-vs-pre": {"post", "pre", "deepnorm"}}


@pytest.fixture(scope="module")
def reproduce(tmp_path_factory):
    """Run each quick reproduction once per module (in-process, one job); returns (code, verdict JSON, out dir)."""
    import contextlib
    import io

    cache = {}

    def run(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            corpus = make_corpus(root / "corpus.txt")
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
                code = main(["reproduce", name, "--quick", "--json", "--jobs", "1", "--data", str(corpus),
                             "--out", str(root / "out")])
            cache[name] = (code, json.loads(stdout.getvalue()), root / "out")
        return cache[name]

    return run


@pytest.mark.parametrize("name", list(KEYS))
def test_quick_reproduction_prints_a_verdict(reproduce, name):
    code, result, out = reproduce(name)
    assert code == 0
    assert set(result["numbers"]) == KEYS[name]
    assert result["verdict"].startswith(f"verdict: {result['claim']}: ")
    assert result["verdict"].endswith("(quick mode: too short to be conclusive; run without --quick)")
    assert isinstance(result["agrees"], bool)
    assert ("-> AGREES" in result["verdict"]) == result["agrees"]
    assert (out / "summary.json").exists() and (out / "ablation.json").exists()
    # every number reported is the mean over the grid's runs, read back from their summaries
    rows = json.loads((out / "summary.json").read_text())["rows"]
    reported = {round(r["final_val_loss_mean"], 3) for r in rows if r["final_val_loss_mean"] is not None}
    for value in result["numbers"].values():
        for number in (value.values() if isinstance(value, dict) else [value]):
            assert number is None or round(number, 3) in reported


def test_tiny_residual_shows_the_article_edit_is_a_bigram_model(reproduce):
    """With the edit, nothing flows through attention or FFN: no gradient reaches them in training."""
    _, result, out = reproduce("tiny-residual")
    assert "audit of (b): 0 residuals, dead: blocks.0.attn, blocks.0.ffn" in result["verdict"]
    records = lambda run: [json.loads(line) for line in  # noqa: E731
                           (out / "runs" / run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    edited = [m for m in records("article-edit-L1-s0") if "grad_norms" in m][-1]["grad_norms"]
    assert edited and not any(".attn." in n or ".ffn." in n for n in edited)
    normal = [m for m in records("post-L1-s0") if "grad_norms" in m][-1]["grad_norms"]
    assert any(".attn." in n for n in normal) and any(".ffn." in n for n in normal)
