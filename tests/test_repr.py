"""Results in a notebook: the lens, the audit, an ablation's summary and a loaded run render as HTML tables with the
command line's column names and the values it prints, `to_pandas()` has the same columns, `__repr__` is a few
lines, and `reslab.load_run` gives the checkpoint's model."""

from __future__ import annotations

import json
import sys
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from conftest import make_corpus

import reslab

TRAIN = ["--model", "gpt", "--layers", "2", "--width", "32", "--heads", "2", "--context", "16", "--batch", "8",
         "--steps", "6", "--log-interval", "3", "--eval-interval", "3", "--eval-batches", "2", "--no-progress"]
PROMPT = "ROMEO:\nthe king and my lord"


class Tables(HTMLParser):
    """Every <table> of a page: its header cells and its rows of cells (text, unescaped)."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: list[dict[str, list]] = []
        self._cell: list[str] | None = None
        self.svg = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append({"header": [], "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("th", "td"):
            self._cell = []
        elif tag == "svg":
            self.svg += 1

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            text = unescape("".join(self._cell))
            (self.tables[-1]["header"] if tag == "th" else self.tables[-1]["rows"][-1]).append(text)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def tables(obj) -> list[dict[str, list]]:
    found = Tables(obj._repr_html_()).tables
    for table in found:
        table["rows"] = [row for row in table["rows"] if row]  # the header's row
    return found


def short(obj) -> str:
    text = repr(obj)
    assert text.count("\n") <= 2 and len(text) < 400 and "tensor(" not in text, text
    return text


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from reslab.cli import main

    root = tmp_path_factory.mktemp("repr")
    out = root / "run"
    assert main(["train", *TRAIN, "--data", str(make_corpus(root / "corpus.txt", 8000)), "--out", str(out)]) == 0
    return out


def test_load_run_gives_the_checkpoint_model(run_dir):
    from reslab.train.checkpoint import load_run_model

    run = reslab.load_run(run_dir)
    model, config = load_run_model(run_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(run.model(ids).logits, model(ids).logits) and not run.model.training
    assert run.config == config and run.summary["steps"] == 6 and run.metrics[-1]["step"] == 6
    assert run.tokenizer.decode(run.tokenizer.encode("ROMEO:")) == "ROMEO:"
    assert short(run).startswith(f"Run({str(run_dir)!r}: gpt, pre")
    summary, settings = tables(run)
    assert summary["header"] == ["field", "value"] and ["steps", "6"] in summary["rows"]
    assert ["model_config.width", "32"] in settings["rows"] and ["train.steps", "6"] in settings["rows"]
    assert list(run.to_pandas().columns)[:2] == list(run.metrics[0])[:2]
    with pytest.raises(reslab.ReslabError, match="is not a reslab run directory"):
        reslab.load_run(run_dir / "tensorboard" if (run_dir / "tensorboard").is_dir() else run_dir.parent)


def cli_table(stdout: str) -> tuple[list[str], list[list[str]]]:
    """The header words and the rows of the table `reslab lens` prints."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("after "))
    end = next(i for i, line in enumerate(lines) if line.startswith("stream: "))
    return lines[start].split(), [line.split() for line in lines[start + 2:end]]


def test_lens_html_is_the_cli_table(run_dir, cli):
    code, out, _ = cli("lens", run_dir, "--prompt", PROMPT)
    assert code == 0
    header, rows = cli_table(out)
    result = reslab.load_run(run_dir).lens(PROMPT)
    (table,) = tables(result)
    assert table["header"] == header == ["after", "loss", "entropy", "top-1", "KL", "DLA"]
    assert table["rows"] == rows
    frame = result.to_pandas()
    assert list(frame.columns) == header
    assert frame["top-1"].tolist() == result.top_1 == result.agreement
    assert frame["DLA"].tolist() == result.dla and frame["after"].tolist() == result.after == result.names
    assert frame["KL"].tolist() == result.kl
    assert "DLA: direct logit contribution" in result._repr_html_() and str(result) in out
    assert short(result).startswith("LensResult('pre', ")


def test_lens_html_without_dla_and_with_a_tuned_lens():
    from reslab.lens.report import lens_table
    from reslab.lens.tuned import fit_tuned_lens

    torch.manual_seed(0)
    model = reslab.build_model("gpt", layers=2, width=16, heads=2, context=16, vocab_size=32, residual="post").eval()
    ids = torch.randint(0, 32, (2, 9))
    tuned, _ = fit_tuned_lens(model, lambda: ids, 2, seed=0)
    result = reslab.lens(model, ids, tuned=tuned)
    printed = lens_table(result).splitlines()  # what `reslab lens` prints for this result
    (table,) = tables(result)
    assert table["header"] == ["after", "loss", "entropy", "top-1", "KL", "tuned loss", "tuned KL"]
    assert " ".join(table["header"]).split() == printed[0].split()
    assert table["rows"] == [line.split() for line in printed[2:]]
    assert list(result.to_pandas().columns) == table["header"] and result.dla is None
    assert "decomposition refused" in result._repr_html_() and "no DLA" in short(result)


def test_audit_html_is_the_cli_report(run_dir, cli):
    code, out, _ = cli("audit", run_dir)
    assert code == 0
    printed = out.splitlines()
    result = reslab.load_run(run_dir).audit()
    assert result.lines() == printed
    page = result._repr_html_()
    (table,) = tables(result)
    assert table["header"] == ["block", "residuals", "around", "sublayers"]
    for row in table["rows"]:
        block, count, around, sublayers = row
        line = f"{block}: {count} residual{'' if count == '1' else 's'}" + (f" — {around}" if around else "")
        assert line + (f"; {sublayers}" if sublayers else "") in printed
    assert all(f"<li>{line.replace('>', '&gt;')}</li>" in page for line in printed if "<" not in line)
    assert Tables(page).svg >= 1
    assert list(result.to_pandas().columns) == table["header"]
    assert short(result).startswith(f"Audit({str(run_dir)!r}: ")


def fake_ablation(root: Path) -> Path:
    """An ablation directory of 2 schemes x 3 seeds (one diverged) written without training."""
    steps = 20
    (root / "ablation.json").write_text(json.dumps({
        "model": "tiny", "grid": {"residual": ["pre", "post"], "layers": [2], "seeds": [0, 1, 2]},
        "train": {"steps": steps}, "baseline": "pre"}))
    for residual, base in (("pre", 2.0), ("post", 2.3)):
        for seed in range(3):
            run = root / "runs" / f"{residual}-L2-s{seed}"
            run.mkdir(parents=True)
            config = {"model": "tiny", "model_config": {"residual": residual, "layers": 2},
                      "train": {"seed": seed, "steps": steps}, "data": {}}
            (run / "config.json").write_text(json.dumps(config))
            if residual == "post" and seed == 2:
                (run / "diverged.json").write_text(json.dumps({"message": "nan", "steps": steps}))
                continue
            loss = base + 0.1 * seed
            (run / "metrics.jsonl").write_text("".join(json.dumps(
                {"step": s, "loss": loss + 1 / s, "val_loss": loss + 1 / s, "train_seconds": s / 10}) + "\n"
                for s in (10, 20)))
            (run / "summary.json").write_text(json.dumps({
                "steps": steps, "final_val_loss": loss + 0.05, "best_val_loss": loss + 0.05,
                "tokens_per_second": 1000.0 + seed, "train_seconds": 2.0, "parameters": 123}))
    return root


def rich_columns(table) -> tuple[list[str], list[list[str]]]:
    return [c.header for c in table.columns], [list(row) for row in zip(*(c.cells for c in table.columns))]


def test_ablation_summary_html_is_the_cli_tables(tmp_path):
    from reslab.ablate.summary import comparison_table, summary_table
    from reslab.ablation_summary import summarize

    root = fake_ablation(tmp_path)
    record = summarize(root)  # what `reslab ablate` and `reslab report` aggregate and print
    summary = reslab.load_ablation(root)
    assert summary.record == json.loads(json.dumps(record)) and summary["baseline"] == "pre"
    shown, against = tables(summary)
    for html, printed in ((shown, summary_table(record)), (against, comparison_table(record))):
        header, rows = rich_columns(printed)
        assert html["header"] == header and html["rows"] == rows
    assert "2 (1 diverged)" in [row[2] for row in shown["rows"]]
    assert list(summary.to_pandas().columns) == shown["header"]
    assert list(summary.to_pandas(comparisons=True).columns) == against["header"]
    assert short(summary).startswith("AblationSummary(tiny, 20 steps, 2 grid points; best pre L2")
    with pytest.raises(reslab.ReslabError, match="not an ablation directory"):
        reslab.load_ablation(tmp_path / "runs")


def test_to_pandas_without_pandas_is_one_line(monkeypatch):
    from reslab.display import data_frame

    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(reslab.ReslabError, match=r"^to_pandas\(\) needs pandas, .*: pip install pandas$"):
        data_frame({"a": [1]})
