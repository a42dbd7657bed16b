"""A Hugging Face `datasets` dataset as a prepare SOURCE: `hf:NAME_OR_FOLDER[:SPLIT]` (optional extra `datasets`).

    reslab data prepare hf:./my-dataset --out data/mine             # a folder written by Dataset.save_to_disk
    reslab data prepare hf:roneneldan/TinyStories:validation --out data/ts   # from the local datasets cache

The dataset must already be on this machine: nothing is downloaded (HF_DATASETS_OFFLINE is set). Datasets are Arrow
files memory-mapped by `datasets`, so rows are read a slice at a time, never the whole corpus. Each row's `text`
column is one document, followed by a blank line. Chunks are whole rows grouped greedily from a starting row, so a
prepare resumed at a chunk's first row groups (and encodes) the rest exactly as the uninterrupted one would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from reslab.data.chunk import Chunk
from reslab.errors import ReslabError

PREFIX = "hf:"
SEPARATOR = "\n\n"
SLICE_ROWS = 256


class DatasetSource:
    """One split of a dataset on this machine; opened on first use."""

    def __init__(self, spec: str, column: str = "text"):
        name, _, split = spec[len(PREFIX):].partition(":")
        self.spec, self.name, self.split, self.column = spec, name, split or "train", column
        self._dataset = None

    def __str__(self) -> str:
        return self.spec

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = _load(self.name, self.split, self.column)
        return self._dataset

    @property
    def rows(self) -> int:
        return len(self.dataset)

    @property
    def nbytes(self) -> int:
        """About the text's size (the Arrow data), to weigh this source in the progress line."""
        return max(1, int(getattr(self.dataset.data, "nbytes", 0)))

    def identity(self) -> list:
        """What names this input in a prepare job: the spec, its row count and the dataset's own fingerprint."""
        return [self.spec, self.rows, str(getattr(self.dataset, "_fingerprint", ""))]

    def chunks(self, start: int = 0, chunk_bytes: int = 1 << 20) -> Iterator[Chunk]:
        """Chunks of whole rows from row `start`: each ends at the first row that brings it to `chunk_bytes`."""
        parts: list[str] = []
        size, first = 0, start
        for row in range(start, self.rows, SLICE_ROWS):
            texts = self.dataset[row:row + SLICE_ROWS][self.column]
            for offset, text in enumerate(texts):
                document = (text or "") + SEPARATOR
                parts.append(document)
                size += len(document)
                if size >= chunk_bytes:
                    end = row + offset + 1
                    yield Chunk("".join(parts), end, first)
                    parts, size, first = [], 0, end
        if parts:
            yield Chunk("".join(parts), self.rows, first)


def _load(name: str, split: str, column: str):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # only what is on this machine
    try:
        import datasets
    except ImportError as err:
        raise ReslabError(f"SOURCE {PREFIX}{name} needs the datasets package: pip install 'reslab[datasets]'") from err
    try:
        folder = Path(name).expanduser()
        if folder.is_dir() and any((folder / saved).exists() for saved in ("dataset_info.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(folder))
            dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            dataset = datasets.load_dataset(name, split=split)
    except KeyError as err:
        raise ReslabError(f"SOURCE {PREFIX}{name}: no split {split!r}; name one as {PREFIX}{name}:SPLIT") from err
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds for "not here"
        raise ReslabError(f"SOURCE {PREFIX}{name}: cannot load it from this machine ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); save it with save_to_disk and pass "
                          f"{PREFIX}FOLDER") from err
    if column not in dataset.column_names:
        raise ReslabError(f"SOURCE {PREFIX}{name} has no {column!r} column (it has: {', '.join(dataset.column_names)})")
    return dataset
