import os
from pathlib import Path

# The tests train tiny models: one thread each is fastest, and it keeps the suite's processes (torchrun ranks,
# ablation workers, CLI subprocesses inherit this) from oversubscribing a small machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_TINYSHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_cli(*args) -> tuple[int, str, str]:
    """`reslab ARGS...` in this process, outside any fixture (a module's own setup): (exit code, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from reslab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def benchmark_json(module, *args: str) -> dict:
    """A benchmark module's `main([*args, "--json"])` in this process: it must succeed; its JSON report, parsed."""
    import io
    import json
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        assert module.main([*args, "--json"]) == 0
    return json.loads(out.getvalue())


def load_benchmark(name: str):
    """The module benchmarks/NAME.py (which may import its neighbours, e.g. scheme_cost's timer)."""
    import importlib.util
    import sys

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tinyshakespeare() -> Path:
    if not SHARED_TINYSHAKESPEARE.exists():
        pytest.skip("../shared/data/tinyshakespeare.txt is not present")
    return SHARED_TINYSHAKESPEARE


@pytest.fixture
def cli(capsys):
    """Run `reslab ARGS...` in-process; returns (exit code, stdout, stderr)."""
    from reslab.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def make_corpus(path: Path, chars: int = 30_000, seed: int = 0) -> Path:
    """A small, learnable text: speaker lines and repeated words, like a miniature play."""
    import random

    rng = random.Random(seed)
    words = ["the", "king", "queen", "and", "of", "my", "lord", "good", "night", "thou", "art", "to", "be", "love"]
    speakers = ["ROMEO", "JULIET", "NURSE"]
    parts, size = [], 0
    while size < chars:
        line = f"{rng.choice(speakers)}:\n" + " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + ".\n\n"
        parts.append(line)
        size += len(line)
    path.write_text("".join(parts)[:chars])
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    return make_corpus(tmp_path / "corpus.txt")


@pytest.fixture(scope="module")
def reproduce(tmp_path_factory):
    """`reslab reproduce NAME --quick --json` run once per test module (in-process, one job, on a corpus of its own);
    returns (exit code, the verdict JSON, the ablation directory)."""
    import contextlib
    import io
    import json

    from reslab.cli import main

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
