"""docs/notebook.ipynb runs top to bottom in a real Jupyter kernel (nbclient + ipykernel) without an error cell, and
its outputs, written as one HTML page, render in headless Chromium (the probe of tests/test_report.py) with the
lens, audit and ablation tables under the command line's column names and the audit's diagram as SVG."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from test_report import chromium_binary, inspect_page

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebook.ipynb"


def output_html(output) -> str:
    """One cell output as a browser shows it in Jupyter: HTML, SVG or PNG when the object has them, else text."""
    if output.output_type == "stream":
        return f"<pre class='{output.name}'>{escape(output.text)}</pre>"
    if output.output_type == "error":
        return f"<pre class='error'>{escape(output.ename)}: {escape(output.evalue)}</pre>"
    data = output.get("data", {})
    if "text/html" in data:
        return data["text/html"]
    if "image/svg+xml" in data:
        return data["image/svg+xml"]
    if "image/png" in data:
        base64.b64decode(data["image/png"], validate=True)
        return f"<img src='data:image/png;base64,{data['image/png']}'>"
    return f"<pre>{escape(data.get('text/plain', ''))}</pre>"


def notebook_html(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        parts.append(f"<pre class='source'>{escape(cell.source)}</pre>")
        parts += [output_html(output) for output in cell.get("outputs", [])]
    return "<!DOCTYPE html><html><head><meta charset='utf-8'><title>notebook</title></head><body>" + \
        "\n".join(parts) + "</body></html>"


def test_notebook_runs_and_renders(tmp_path, monkeypatch, tinyshakespeare):
    monkeypatch.setenv("RESLAB_NOTEBOOK_DATA", str(tinyshakespeare))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's runs go under the test's directory
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # an error cell raises here
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    streams = "".join(o.text for o in outputs if o.output_type == "stream")
    assert "Traceback" not in streams and "error" not in streams.lower(), streams[-2000:]
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert len(html) >= 4  # the run, the lens, the lens as a DataFrame, the audit, the ablation summary

    monkeypatch.undo()  # Chromium puts its sockets under TMPDIR: the test's deep directory overflows a socket path
    page_path = tmp_path / "notebook.html"
    page_path.write_text(notebook_html(notebook))
    page = inspect_page(chromium_binary(), page_path.as_uri(), tmp_path / "chromium")
    assert page["problems"] == [], page["problems"]
    assert all(url == page_path.as_uri() or url.startswith("data:") for url in page["requests"]), page["requests"]
    text = page["text"]
    for words in ("after\tloss\tentropy\ttop-1\tKL\tDLA", "block\tresiduals\taround\tsublayers", "summary.json",
                  "model_config.width", "scheme\tdepth\tseeds", "95% interval", "logit lens, pre", "LensResult('pre'"):
        assert words in text, words
    assert page["tables"] >= 6
    assert page["svgs"] and all(width > 100 and height > 100 for width, height in page["svgs"]), page["svgs"]
