"""A piece of a text source, as every source yields it (`sources.text_chunks` for files, `hf_source` for datasets)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Chunk:
    text: str
    end: int  # byte offset in the file just after this chunk's text
    start: int = 0  # byte offset in the file where this chunk's text starts
    characters: int = 0  # set by readers that drop `text` once it is handed on
