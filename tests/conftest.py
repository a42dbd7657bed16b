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
