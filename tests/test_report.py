"""The ablation report: plots, a self-contained report.html, `reslab report`, and a render in headless Chromium.

How the Chromium check works (test_report_renders_in_chromium):
1. The report is opened in headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
   we write JSON commands to the browser's fd 3 and read replies and events from its fd 4; no port, no websocket
   library). With the Runtime, Log, Network and Page domains enabled, every console call (`consoleAPICalled`), uncaught
   exception (`exceptionThrown`), error log entry (`Log.entryAdded`, which is where "Failed to load resource" lands),
   failed load (`Network.loadingFailed`) and every request the page makes (`Network.requestWillBeSent`) arrives as an
   event. After the load event we read the rendered text and the decoded size of every image from the page itself.
   The same probe is first run on a page that is broken on purpose (console.error, an exception, a missing image, a
   request to another host), and must report all four: a probe that has gone deaf fails the test instead of passing.
2. The plain command line a person would use also runs: `chromium --headless ... --screenshot=FILE
   --window-size=1280,2000 --enable-logging=stderr --v=0`; its screenshot must not be blank (many distinct colours,
   not mostly white) and stderr must carry no `CONSOLE` line (Chromium logs each console message there as
   `INFO:CONSOLE...`; the report has no scripts, so any message is a fault). Failed image loads do not show up in that
   log, which is why step 1 exists.
Without Chromium the test is skipped, unless RESLAB_REQUIRE_CHROMIUM is set (CI sets it), where it fails.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shlex
import shutil
import subprocess
import threading
import time
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import make_corpus

SCHEMES = ("pre", "none")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory) -> Path:
    """A real, tiny ablation (2 schemes x 2 seeds, 30 steps), its report written by `reslab ablate` itself."""
    from reslab.cli import main

    root = tmp_path_factory.mktemp("report")
    corpus = make_corpus(root / "corpus.txt")
    out = root / "ablation"
    code = main(["ablate", "--width", "16", "--context", "16", "--batch", "8", "--steps", "30", "--eval-interval", "10",
                 "--eval-batches", "4", "--log-interval", "5", "--layers", "2", "--residual", ",".join(SCHEMES),
                 "--seeds", "0,1", "--jobs", "1", "--data", str(corpus), "--out", str(out)])
    assert code == 0
    return out


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_report_is_self_contained_and_complete(ablation):
    from reslab.residual import get_scheme

    report = ablation / "report.html"
    assert report.exists(), "reslab ablate should write report.html at the end"
    text = report.read_text()
    parser = _Links()
    parser.feed(text)
    images = [attrs for tag, attrs in parser.tags if tag == "img"]
    assert len(images) >= 3  # loss, gradient norms, stream profile
    for attrs in images:
        assert attrs["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(attrs["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for tag, attrs in parser.tags:
        for name in ("src", "href", "action", "poster", "srcset"):
            value = (attrs.get(name) or "").strip().lower()
            remote = value.startswith(("http:", "https:", "//", "ftp:"))
            assert not remote, f"<{tag} {name}={value!r}> loads from the net"
            if value and tag != "a":
                assert value.startswith("data:"), f"<{tag} {name}={value!r}> is not inline"
    assert all(tag not in ("script", "iframe", "object", "embed") for tag, _ in parser.tags)
    assert "@import" not in text and "url(" not in text
    for scheme in SCHEMES:
        cls = get_scheme(scheme)
        assert f">{scheme}<" in text
        assert escape(cls.formula) in text
        assert escape(cls.paper) in text
    for needed in ("Summary table", "How to read this", "drift", "stream RMS", "grid: residual"):
        assert needed in text
    meta = json.loads((ablation / "ablation.json").read_text())
    assert escape(shlex.join(meta["command"])) in text  # the exact command, as recorded
    assert escape(json.dumps(meta["train"]["lr"])) in text
    for name in ("loss.png", "grads.png", "profile.png"):
        png = ablation / "plots" / name
        assert png.stat().st_size > 20_000, f"{name} looks empty"
        from PIL import Image

        with Image.open(png) as image:
            assert image.width >= 800 and image.height >= 400
            assert len(image.convert("RGB").getcolors(1 << 20) or []) > 200


def test_report_command_and_bad_directories(ablation, tmp_path, cli):
    out = tmp_path / "elsewhere.html"
    code, stdout, stderr = cli("report", ablation, "--out", out)
    assert code == 0, stderr
    assert stdout.strip() == str(out) and out.read_text().startswith("<!DOCTYPE html>")

    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "ablation.json").write_text("{not json")
    for bad, words in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "no ablation.json"),
                       (tmp_path / "file.txt", "not an ablation directory"),
                       (tmp_path / "broken", "ablation.json is not valid JSON")):
        code, stdout, stderr = cli("report", bad)
        assert code == 2
        assert stderr.count("\n") == 1 and stderr.startswith("reslab: error:") and words in stderr, stderr


def _write_run(root: Path, residual: str, layers: int, seed: int, steps: int, records: list[dict] | None,
               status: str = "finished", extra_line: str = "") -> None:
    run = root / "runs" / f"{residual}-L{layers}-s{seed}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "model": "tiny", "model_config": {"residual": residual, "layers": layers, "vocab_size": 20, "width": 16},
        "train": {"seed": seed, "steps": steps}, "data": {"description": "a <test> corpus", "tokens": 1000,
                                                           "train_tokens": 900, "val_tokens": 100, "sha256": "ab"}}))
    if records is not None:
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + extra_line)
    if status == "finished":
        last = records[-1] if records else {}
        (run / "summary.json").write_text(json.dumps({
            "steps": steps, "final_val_loss": last.get("val_loss"), "best_val_loss": last.get("val_loss"),
            "tokens_per_second": 1000.0, "train_seconds": 1.0, "parameters": 123, "first_layer_grad_share": None,
            "final_stream_rms": last.get("stream_rms"), "final_drift": last.get("drift"), "mean_drift": None}))
    elif status == "diverged":
        (run / "diverged.json").write_text(json.dumps({"message": "loss became nan by step 20", "steps": steps}))


def test_report_handles_odd_grids_without_training(tmp_path):
    """No seeds to average, a scheme reslab does not know, runs without diagnostics, diverged, cut-off and unstarted
    runs, a missing summary.json: the report is still written, and says what is missing."""
    from reslab.report import write_report

    root = tmp_path / "odd"
    root.mkdir()
    steps = 20
    (root / "ablation.json").write_text(json.dumps({
        "command": ["reslab", "ablate", "--residual", "pre,<mystery>"], "model": "tiny",
        "grid": {"residual": ["pre", "<mystery>"], "layers": [1, 3], "seeds": [0]}, "model_overrides": {},
        "train": {"steps": steps}, "started": 0.0, "finished": None}))
    plain = [{"step": 10, "loss": 3.0, "val_loss": 3.1}, {"step": 20, "loss": 2.5, "val_loss": 2.6}]
    probed = [{**r, "block_grad_norms": [0.1 * r["step"], 0.2, 0.3], "stream_rms": [1.0, 1.5, 2.0],
               "drift": [0.9, 0.8, 0.7], "update_ratio": [[0.1, 0.2], [0.2, 0.3], [0.3, 0.4]], "amax_gain_forward": 1.2}
              for r in plain]
    _write_run(root, "pre", 1, 0, steps, plain)  # diagnostics off
    _write_run(root, "pre", 3, 0, steps, probed, extra_line='{"step": 30, "loss"')  # a line cut off by a crash
    _write_run(root, "<mystery>", 1, 0, steps, plain[:1], status="diverged")
    _write_run(root, "<mystery>", 3, 0, steps, None, status="new")
    path = write_report(root)
    text = path.read_text()
    assert "&lt;mystery&gt;" in text and "<mystery>" not in text  # escaped, everywhere
    assert "not registered" in text and "diverged" in text and "not finished" in text
    assert "a &lt;test&gt; corpus" in text
    assert {p.name for p in (root / "plots").glob("*.png")} == {"loss.png", "grads.png", "profile.png", "amax.png"}
    assert (root / "summary.json").exists()  # recomputed for the report

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "ablation.json").write_text(json.dumps({"model": "tiny", "grid": {"residual": ["pre"], "layers": [2],
                                                                                "seeds": [0]}, "train": {}}))
    text = write_report(empty).read_text()
    assert "No grid point has finished yet" in text and "nothing to plot" in text


# --- Chromium ------------------------------------------------------------------------------------------------------

def chromium_binary() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        if "RESLAB_REQUIRE_CHROMIUM" in os.environ:
            pytest.fail("RESLAB_REQUIRE_CHROMIUM is set but chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI sets RESLAB_REQUIRE_CHROMIUM=1")
    return path


class DevTools:
    """Headless Chromium driven over the DevTools protocol on a pipe: JSON messages ending in NUL, fd 3 in, fd 4 out."""

    def __init__(self, binary: str, profile: Path, log: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # the browser's ends, as numbers >= 10 so the redirections below cannot clobber each other
        read_end = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        write_end = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._log = open(log, "wb")
        script = f'exec "$0" "$@" 3<&{read_end} 4>&{write_end} {read_end}<&- {write_end}>&-'
        self.process = subprocess.Popen(
            ["bash", "-c", script, binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
             "about:blank"], pass_fds=(read_end, write_end), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT)
        os.close(read_end)
        os.close(write_end)
        self._messages: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self._next_id = 0
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_browser, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in messages:
                self._messages.put(json.loads(message))
        self._messages.put(None)

    def _receive(self, deadline: float) -> dict:
        try:
            message = self._messages.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError("chromium did not answer over the DevTools pipe in time") from None
        if message is None:
            raise RuntimeError("chromium closed the DevTools pipe")
        return message

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(event.get("method") == method for event in self.events):
            self.events.append(self._receive(deadline))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        self._log.close()


def inspect_page(binary: str, url: str, work: Path) -> dict:
    """Load `url` and return what went wrong (console calls, exceptions, error logs, failed loads), every request,
    the page's visible text, each image's [complete, naturalWidth, naturalHeight], the number of tables and each
    inline SVG's rendered [width, height] (tests/test_notebook.py uses this too)."""
    work.mkdir(parents=True, exist_ok=True)
    browser = DevTools(binary, work / "profile", work / "chromium.log")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 2000, "deviceScaleFactor": 1,
                                                            "mobile": False}, session=session)
        browser.send("Page.navigate", {"url": url}, session=session)
        browser.wait_for("Page.loadEventFired")
        page = browser.send("Runtime.evaluate", {"returnByValue": True, "expression": (
            "JSON.stringify({text: document.body.innerText,"
            " images: [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]),"
            " tables: document.querySelectorAll('table').length,"
            " svgs: [...document.querySelectorAll('svg')].map(s => [s.clientWidth, s.clientHeight])})")},
            session=session)
        page = json.loads(page["result"]["value"])
    finally:
        browser.close()
    problems, requests = [], []
    for event in browser.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            problems.append(f"console.{params['type']}: {[a.get('value') for a in params.get('args', [])]}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            problems.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            problems.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}")
        elif method == "Network.loadingFailed":
            problems.append(f"failed load: {params.get('errorText')}")
        elif method == "Network.requestWillBeSent":
            requests.append(params["request"]["url"])
    return {"problems": problems, "requests": requests, **page}


def test_report_renders_in_chromium(ablation, tmp_path):
    binary = chromium_binary()

    # The probe must hear a broken page, or its silence about the report means nothing.
    broken = tmp_path / "broken.html"
    broken.write_text('<!DOCTYPE html><html><body><p>broken on purpose</p><script>console.error("planted")</script>'
                      '<img src="missing.png"><img src="http://127.0.0.1:9/x.png"><script>no_such_fn()</script>'
                      "</body></html>")
    control = inspect_page(binary, broken.as_uri(), tmp_path / "control")
    found = "\n".join(control["problems"])
    assert "planted" in found and "no_such_fn" in found and "ERR_FILE_NOT_FOUND" in found, found
    assert any(url.startswith("http://127.0.0.1") for url in control["requests"])

    report = ablation / "report.html"
    page = inspect_page(binary, report.as_uri(), tmp_path / "report")
    assert page["problems"] == [], page["problems"]
    assert all(url == report.as_uri() or url.startswith("data:") for url in page["requests"]), page["requests"]
    assert len(page["images"]) >= 3 and all(done and width > 300 and height > 200
                                            for done, width, height in page["images"]), page["images"]
    for scheme in SCHEMES:
        from reslab.residual import get_scheme

        assert get_scheme(scheme).formula in page["text"]
    assert "Summary table" in page["text"] and "How to read this" in page["text"]

    # The one-line command a person would run: a screenshot that is not blank, and no console messages.
    screenshot = tmp_path / "report.png"
    result = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-shot'}",
                             f"--screenshot={screenshot}", "--window-size=1280,2000", "--enable-logging=stderr",
                             "--v=0", report.as_uri()], capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    from PIL import Image

    with Image.open(screenshot) as image:
        pixels = image.convert("RGB")
        assert pixels.size == (1280, 2000)
        colours = pixels.getcolors(1 << 24)
        white = sum(count for count, colour in colours if colour == (255, 255, 255))
        assert len(colours) > 500, f"the screenshot has only {len(colours)} colours: blank?"
        assert white < 0.9 * 1280 * 2000, "the screenshot is almost all white"
