"""The docs are run: every command of README.md and docs/*.md succeeds in the order printed, and the committed
SVGs in docs/ are what the commands recorded beside them draw today.

Marker convention:

- ```` ```bash ````: every line is a `reslab` command (comments, and `\\` continuations, allowed); the test runs it.
- `<!-- no-run: REASON -->` on the line before a block's fence: shown, not run; REASON is one of SKIP_REASONS (an
  install, a GPU, a cluster, a download, a long experiment that tests/ runs elsewhere). The comment is invisible
  on GitHub and leaves the fence a plain ```` ```bash ````. Anything but `reslab` in a block to run is an error.
- ```` ```python run ````: run (exec) in the same directory, between the commands around it; ```` ```python
  file=NAME ```` is written to NAME there. Other python blocks are illustrations, not run.

Each file runs in its own temporary directory, at a tiny size: the test rewrites flags (`tiny`, below: a few steps,
width 16, one seed, ...), nothing in the library changes. `../shared/data/tinyshakespeare.txt` is the shared
tinyshakespeare file, the `tinyshakespeare` and `shakespeare` corpora are that file in `RESLAB_CACHE` (nothing is
downloaded), and `corpus/`, `more/*.txt` and `my-text/` are slices of it. Commands run in this process through
`reslab.cli.main`, so torch is imported once.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
from pathlib import Path

import pytest

from reslab.cli import main

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_REASONS = {
    "install": "installs packages (pip, a virtual environment)",
    "gpu": "needs a CUDA GPU or a GPU-sized data set",
    "cluster": "starts several processes or machines (torchrun, Ray); tests/test_distributed.py and "
               "tests/test_ray_executor.py run them",
    "network": "downloads",
    "long": "a whole experiment; tests/test_reproduce.py runs each at its quick size",
}
FENCE = re.compile(r"^(?:<!-- no-run: (\w+) -->\n)?```(\w*)([^\n]*)\n(.*?)^```", re.S | re.M)

# the tiny size, per subcommand: flags set (replacing the docs' value) or added
SHAPE = {"--width": "16", "--heads": "2", "--context": "16", "--layers": "2", "--batch": "2"}
TRAIN = {**SHAPE, "--steps": "4", "--eval-interval": "2", "--eval-batches": "1", "--log-interval": "2",
         "--checkpoint-interval": "4", "--log": "none"}
TINY = {"train": TRAIN, "ablate": {**TRAIN, "--jobs": "1"},
        "bench": {**SHAPE, "--warmup": "1", "--iters": "1", "--windows": "1"},
        "sample": {"--tokens": "16"}, "lens": {"--tuned-steps": "2", "--tuned-batch": "2"},
        "prepare": {"--vocab-size": "300", "--workers": "1"}}
SWITCHES = {"train": ["--no-progress"], "ablate": ["--no-progress", "--no-report"]}  # `reslab report` draws it
DROPPED = {"--compile"}  # compiling takes about a minute on two cores


def blocks(path: Path) -> list[tuple[str, str, str]]:
    """(language, marker, text) of each fenced block; the marker is `no-run:REASON` or the fence's info string."""
    return [(language, f"no-run:{skip}" if skip else marker.strip(), text)
            for skip, language, marker, text in FENCE.findall(path.read_text())]


def steps(path: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """What to run, in order ("reslab", command line / "python", code / "file=NAME", text), and what is skipped
    (reason, first line)."""
    run, skipped = [], []
    for language, marker, text in blocks(path):
        if marker.startswith("no-run:"):
            reason = marker.removeprefix("no-run:")
            assert reason in SKIP_REASONS, f"{path.name}: no-run:{reason} is none of {sorted(SKIP_REASONS)}"
            skipped.append((reason, text.strip().splitlines()[0]))
        elif language == "bash":
            for line in text.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    assert words[0] == "reslab", f"{path.name}: {line!r} is not a reslab command; mark its block " \
                                                 "no-run:REASON"
                    run.append(("reslab", shlex.join(words[1:])))
        elif language == "python" and (marker == "run" or marker.startswith("file=")):
            run.append((marker, text))
    return run, skipped


def tiny(args: list[str]) -> list[str]:
    """The command at the tiny size, on the local text."""
    command = args[1] if args[:1] == ["data"] else args[0]
    if "--resume" in args or "--help" in args:
        return args
    settings = dict(TINY.get(command, {}))
    if command in ("train", "ablate") and "--config" not in args:
        data = args[args.index("--data") + 1] if "--data" in args else "shakespeare"
        settings["--data"] = "tinyshakespeare" if data == "shakespeare" else data
    if command == "prepare" and "--vocab-size" not in args:
        del settings["--vocab-size"]
    out, words = [], iter(args)
    for word in words:
        name, _, inline = word.partition("=")
        if name in DROPPED:
            continue
        if name in settings or (command == "ablate" and name in ("--seeds", "--residual")):
            given = inline or next(words)
            keep = given.split(",")[:2] if name == "--residual" else given.split(",")[:1]  # a smaller grid
            out += [name, settings.pop(name, ",".join(keep))]
        else:
            out.append(word)
    for name, value in settings.items():
        out += [name, value]
    return out + [switch for switch in SWITCHES.get(command, []) if switch not in out]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """RESLAB_CACHE holding tinyshakespeare (checked against its sha256 as if downloaded); shared by all files."""
    cache = tmp_path_factory.mktemp("cache")
    shutil.copy(TEXT, cache / "tinyshakespeare.txt")
    return cache


def workspace(root: Path) -> Path:
    """The files the docs' examples read, beside and below the directory commands run in."""
    text = TEXT.read_text()
    (root / "shared" / "data").mkdir(parents=True)
    (root / "shared" / "data" / "tinyshakespeare.txt").symlink_to(TEXT)
    work = root / "work"
    for name, part in (("corpus/plays.txt", text[:40_000]), ("more/sonnets.txt", text[40_000:60_000]),
                       ("my-text/notes.txt", text[60_000:120_000]),
                       ("text.txt", text[:200_000])):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(part)
    (work / "docs").mkdir()
    return work


def run_step(kind: str, text: str) -> tuple[int, str]:
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        if kind == "reslab":
            try:
                code = main(tiny(shlex.split(text)))
            except SystemExit as exit_:
                code = exit_.code
        elif kind == "run":
            exec(compile(text, "<docs>", "exec"), {"__name__": "__docs__"})
            code = 0
        else:
            Path(kind.removeprefix("file=")).write_text(text)
            code = 0
    return code, output.getvalue()


@pytest.mark.parametrize("doc", DOCS, ids=[path.name for path in DOCS])
def test_the_commands_of_the_docs_run_in_the_order_printed(doc, cache, tmp_path, monkeypatch):
    run, skipped = steps(doc)
    work = workspace(tmp_path)
    monkeypatch.chdir(work)
    monkeypatch.setenv("RESLAB_CACHE", str(cache))
    monkeypatch.setenv("RESLAB_NO_MEMORY_CHECK", "1")
    for kind, text in run:
        code, output = run_step(kind, text)
        assert code == 0, f"{doc.name}: `{text if kind == 'reslab' else kind}` exited {code}:\n{output[-3000:]}"
    print(f"{doc.name}: ran {len(run)} commands and blocks, skipped {len(skipped)} blocks "
          f"({', '.join(reason for reason, _ in skipped) or 'none'})")


def test_every_docs_page_runs_something_or_says_why_not():
    counted = {doc.name: steps(doc) for doc in DOCS}
    assert sum(len(run) for run, _ in counted.values()) >= 50  # the docs were read
    assert all(run or skipped or not any(language == "bash" for language, _, _ in blocks(ROOT / "docs" / name))
               for name, (run, skipped) in counted.items() if name != "README.md")


# -- the committed SVGs ----------------------------------------------------------------------------------------------

SVG_COMMAND = re.compile(r"<!-- (docs/[\w.-]+\.svg) is drawn by: `(reslab [^`]+)`(?: \(as ([\w./-]+)\))? -->")


def svg_commands() -> dict[str, tuple[str, str]]:
    """docs/NAME.svg -> (the command recorded beside it, the file that command writes)."""
    found = {}
    for doc in DOCS:
        for svg, command, written in SVG_COMMAND.findall(doc.read_text()):
            found[svg] = (command, written or svg)
    return found


def test_every_committed_svg_is_what_its_recorded_command_draws(tmp_path, monkeypatch):
    commands = svg_commands()
    assert set(commands) == {f"docs/{path.name}" for path in (ROOT / "docs").glob("*.svg")}, "record the command " \
        "that draws each docs/*.svg beside the image: <!-- docs/NAME.svg is drawn by: `reslab ...` -->"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    for svg, (command, written) in sorted(commands.items()):
        code, output = run_step("reslab", command.removeprefix("reslab "))
        assert code == 0, output
        assert (tmp_path / written).read_text() == (ROOT / svg).read_text(), f"{svg} is stale; run `{command}`" + (
            f" and copy {written} to {svg}" if written != svg else "")
