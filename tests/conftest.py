import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_TINYSHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


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
