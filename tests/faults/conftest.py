import random
from pathlib import Path

import pytest

from faults.helpers import RUN, final, metrics, reslab_process

LINES = ["Now is the winter of our discontent", "Made glorious summer by this sun of York",
         "And all the clouds that lour'd upon our house", "In the deep bosom of the ocean buried"]


@pytest.fixture(scope="session")
def fault_corpus(tmp_path_factory) -> Path:
    """About 20 kB of verse lines in a seeded order: enough for a train and a validation split."""
    order = random.Random(7)
    path = tmp_path_factory.mktemp("fault-data") / "corpus.txt"
    path.write_text("\n".join(order.choice(LINES) for _ in range(500)) + "\n")
    return path


@pytest.fixture(scope="session")
def reference(fault_corpus, tmp_path_factory) -> dict:
    """The uninterrupted run every recovered run must equal: its metrics (timing aside) and final losses."""
    run = tmp_path_factory.mktemp("reference") / "run"
    done = reslab_process(["train", *RUN, "--data", fault_corpus, "--out", run])
    assert done.returncode == 0, done.stderr
    return {"metrics": metrics(run), "final": final(run), "dir": run}
