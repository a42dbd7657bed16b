"""`reslab reproduce NAME --quick`: each reproduction runs its grid and prints a verdict with the numbers."""

import json

import pytest
from conftest import make_corpus

from reslab.cli import main

KEYS = {"tiny-residual": {"residual", "article_edit", "no_residual"}, "depth": {"none", "pre"},
        "post-vs-pre": {"post", "pre", "deepnorm"}, "deepseek-residuals": {"pre", "post", "none", "mhc",
                                                                                  "deepseek-v4"}}


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
    summaries = [out / "summary.json", *out.glob("*/summary.json")]  # a second grid (deepseek-residuals' V4) in out/*
    rows = [row for summary in summaries for row in json.loads(summary.read_text())["rows"]]
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


# --- the diagram reproductions: no training, seconds ---------------------------------------------------------------
def test_minimind_diagram_names_the_claims_the_code_lacks(cli, tmp_path):
    import xml.etree.ElementTree as ET
    from importlib.resources import files

    code, out, _ = cli("reproduce", "minimind-diagram", "--json", "-o", tmp_path)
    assert code == 0
    result = json.loads(out)
    assert result["agrees"] is False and result["verdict"].endswith("-> DISAGREES")
    implements, _, lacks = result["measured"].partition("; it lacks ")
    assert "around blocks.*.attn (8 of 8)" in implements and "around blocks.*.ffn (8 of 8)" in implements
    assert "inside blocks.*.attn (0 of 8)" in lacks and "inside blocks.*.ffn (0 of 8)" in lacks
    assert "around" not in lacks and "inside" not in implements
    # the published claim ships with reslab (package data) and is copied next to the diagram
    shipped = files("reslab.reproduce").joinpath("designs", "minimind.json").read_text()
    assert json.loads((tmp_path / "design.json").read_text()) == json.loads(shipped)
    svg = ET.parse(tmp_path / "diagram.svg").getroot()
    dashed = [p for p in svg.iter("{http://www.w3.org/2000/svg}path") if p.get("stroke") == "#d62728"]
    assert sorted(p.find("{http://www.w3.org/2000/svg}title").text.rpartition(": ")[2] for p in dashed) == \
        ["inside blocks.*.attn", "inside blocks.*.ffn"]


def test_shipped_design_is_package_data():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "designs/*.json" in pyproject["tool"]["setuptools"]["package-data"]["reslab.reproduce"]


def test_book_figure_draws_both_networks_from_the_code(cli, tmp_path):
    import xml.etree.ElementTree as ET

    code, out, _ = cli("reproduce", "book-figure", "--json", "-o", tmp_path)
    assert code == 0
    result = json.loads(out)
    assert result["agrees"] is True
    assert result["numbers"]["with_shortcut"] == 4 and result["numbers"]["without_shortcut"] == 0
    root = ET.parse(tmp_path / "book-figure.svg").getroot()
    svg = "{http://www.w3.org/2000/svg}"
    plain, shortcut = root.findall(f"{svg}svg")
    assert float(shortcut.get("x")) >= float(plain.get("width"))  # side by side, not overlapping
    texts = lambda part: ["".join(t.itertext()) for t in part.iter(f"{svg}text")]  # noqa: E731
    assert texts(plain)[0] == "without shortcut connections" and texts(shortcut)[0] == "with shortcut connections"
    assert "+" not in texts(plain) and texts(shortcut).count("+") == 4
    assert sum(texts(part).count("Linear") for part in (plain, shortcut)) == 10  # five layers each


def test_leaderboard_ranks_every_scheme_and_reuses_done_points(tmp_path):
    """The leaderboard (quick grid) writes a page with both rankings, each scheme's interval and its paired test
    against pre, and plots beside it; run again with one more scheme, only that scheme's points train."""
    import contextlib
    import io

    corpus = make_corpus(tmp_path / "corpus.txt")
    page = tmp_path / "docs" / "board.md"
    args = ["reproduce", "leaderboard", "--quick", "--jobs", "1", "--data", str(corpus), "--out", str(tmp_path / "lb"),
            "--write", str(page)]
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(args) == 0
    text = page.read_text()
    assert text.count("## gpt, 1 block: ") == 2  # equal steps and equal wall time
    assert "| `pre` |" in text and "| `none` |" in text and "baseline" in text
    steps_table = text.split("equal steps: final val loss")[1].split("##")[0]
    none = next(line for line in steps_table.splitlines() if "`none`" in line)
    assert none.count("[") == 2 and ("better" in none or "worse" in none or "no difference at this n" in none)
    assert (tmp_path / "docs" / "board" / "gpt-forest.png").stat().st_size > 0
    assert (tmp_path / "lb" / "leaderboard.md").exists()
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "lb" / "gpt" / "runs").glob("*/checkpoint.safetensors")}
    assert len(done) == 4
    with contextlib.redirect_stderr(io.StringIO()):
        assert main([*args, "--schemes", "pre,none,rezero"]) == 0
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "lb" / "gpt" / "runs").glob("*/checkpoint.safetensors")}
    assert {p: after[p] for p in done} == done and len(after) == 6
    assert "| `rezero` |" in page.read_text()
