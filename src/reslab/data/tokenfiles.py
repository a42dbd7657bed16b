"""Token files as a training run reads them: fast, and safe when another process changes them under the run.

Random windows are gathered fastest from a memory map, but a map of a file that another process truncates kills the
reader with SIGBUS at its next touch of a lost page, and a file rewritten in place changes the tokens without a word.
So a file is read through its map only while a read lease guards it (`fcntl(F_SETLEASE, F_RDLCK)`, Linux): a process
that then opens the file for writing or truncates it is held back (one that opens with O_NONBLOCK, as `truncate`
does, fails at once), and this process is told at once (SIGIO). The notice turns the file over to `os.pread` and
marks it `changed`; the lease is let go as soon as no read is in progress (`reading()`: a gather, or a whole
training step, so the step ends on the tokens it began with), and the writer goes on. The trainer then stops,
checkpointed. (Held longer than /proc/sys/fs/lease-break-time, 45 s by default, a lease is taken away anyway; the
reads are pread by then.)

Where no lease can be had (another user's file, a file open for writing elsewhere, NFS, a thread that cannot take
signals), a file is read with `os.pread` from the start: slower per window, but a truncated file is a short read,
raised as `DataChanged` (one line naming the file), never a signal.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import stat
import threading
import weakref
from pathlib import Path

import numpy as np

from reslab.errors import ReslabError

try:  # POSIX; without them (Windows) every file is read with pread and no limit is raised
    import fcntl
    import resource
except ImportError:  # pragma: no cover - not on the platforms the suite runs on
    fcntl = resource = None  # type: ignore[assignment]
# read leases and their notice: Linux only (macOS and the BSDs have fcntl but neither F_SETLEASE nor leases)
LEASES = fcntl is not None and hasattr(fcntl, "F_SETLEASE") and hasattr(signal, "SIGIO")

_leased: dict[int, weakref.ref[TokenFile]] = {}  # fd -> its file, for the lease-break handler
_broken: list[int] = []  # fds whose lease broke, let go (F_UNLCK) once no read is in progress
_readers = [0]  # reads in progress: gathers, training steps
_breaks = [0]  # lease breaks noticed in this process: spans rebuild their cached views when it moves
_guarding: list = [0, False]  # leases being taken, and whether a notice came meanwhile (handled after them)
_handler: list = []  # the signal handler this module installed (once per process), and the one it replaced


class DataChanged(ReslabError):
    """A token file changed under a running training: truncated, or opened for writing by another process."""


def open_regular(path: Path, fix: str) -> int:
    """A descriptor of `path` opened for reading, refused (one line naming it, with `fix`) unless it is a regular
    file: opened without blocking, then checked on the descriptor itself, so a FIFO (whose open or read waits for a
    writer forever), a device or a directory swapped in at any moment is refused, never waited on."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ReslabError(f"{path} is missing; {fix}") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ReslabError(f"{path} is a symlink loop; {fix}") from None
        raise
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise ReslabError(f"{path} is not a regular file (a directory, pipe, socket or device); {fix}")
    os.set_blocking(descriptor, True)
    return descriptor


def read_regular(path: Path, fix: str, limit: int = -1) -> bytes:
    """The bytes of the regular file `path` (the first `limit` of them, or all), through `open_regular`."""
    with open(open_regular(path, fix), "rb", closefd=True) as handle:
        return handle.read(limit)


class TokenFile:
    """`tokens` tokens of `dtype` from byte `offset` of one file, open (`size`: its bytes when opened) for the life
    of this object. After `guard()`, `view` is the file's memory map while a lease guards it, else None (pread)."""

    def __init__(self, path: Path, dtype: np.dtype, offset: int, tokens: int, fix: str = "prepare the data again"):
        self.path, self.dtype, self.offset, self.tokens = path, dtype, offset, tokens
        self.fd = open_regular(path, fix)
        weakref.finalize(self, _close, self.fd)
        info = os.fstat(self.fd)
        self.size, self.signature = info.st_size, [info.st_size, info.st_mtime_ns, info.st_ctime_ns]
        self.view: np.ndarray | None = None
        self.changed = False
        self.sha256: str | None = None  # the checksum its manifest records, where it has one

    def __len__(self) -> int:
        return self.tokens

    def guard(self) -> TokenFile:
        """Read through the map from now on if a lease can guard it (checked to hold `tokens` tokens first). A
        lease-break notice while the lease is taken and the map made waits for both (`_notice`)."""
        if self.size < self.offset + self.tokens * self.dtype.itemsize:
            return self
        _guarding[0] += 1
        try:
            if _lease(self):
                self.view = _mapped(self.fd, self.dtype, self.offset, self.tokens)
        finally:
            _guarding[0] -= 1
            if _guarding[1] and not _guarding[0]:
                _guarding[1] = False
                _notice_breaks()
        return self

    def __getitem__(self, window: slice) -> np.ndarray:
        """Tokens [start, stop) (both >= 0; clipped to the file, as an array slice is) with pread: what a span reads
        where the file has no map. A file cut short under the run is `DataChanged`."""
        start, stop = window.start, min(window.stop, self.tokens)
        size = max(stop - start, 0) * self.dtype.itemsize
        data = os.pread(self.fd, size, self.offset + start * self.dtype.itemsize)
        if len(data) != size:
            raise DataChanged(f"{self.path} was truncated while this run read it (it no longer holds its "
                              f"{self.tokens:,} tokens)")
        return np.frombuffer(data, self.dtype)


def reserve_descriptors(files: int) -> None:
    """Raise the soft limit on open files (up to the hard one) when a corpus has more shards than it allows: each
    file holds a descriptor and a map."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * files + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY
                                                        else min(wanted, hard), hard))


def lease_breaks() -> int:
    return _breaks[0]


def start_reading() -> None:
    _readers[0] += 1


def stop_reading() -> None:
    """The end of a read: the leases that broke during it are let go, so their writers go on."""
    _readers[0] -= 1
    if _broken and not _readers[0]:
        while _broken:
            with contextlib.suppress(OSError):
                fcntl.fcntl(_broken.pop(), fcntl.F_SETLEASE, fcntl.F_UNLCK)


@contextlib.contextmanager
def reading():
    """A read that must end on the bytes it began with (a training step): broken leases wait for its end."""
    start_reading()
    try:
        yield
    finally:
        stop_reading()


def _mapped(descriptor: int, dtype: np.dtype, offset: int, tokens: int) -> np.ndarray:
    """The file's map as a read-only array; reads are random, so no readahead (a window maps a few pages)."""
    handle = mmap.mmap(descriptor, 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_RANDOM"):
        with contextlib.suppress(OSError):
            handle.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(handle, dtype=dtype, count=tokens, offset=offset)


def _close(descriptor: int) -> None:
    _leased.pop(descriptor, None)
    if descriptor in _broken:  # its number may be reused by the next file opened
        _broken.remove(descriptor)
    os.close(descriptor)


def _lease(file: TokenFile) -> bool:
    """Take a read lease on `file` (True), or leave it to pread (False)."""
    if not LEASES or not _install_handler():
        return False
    try:
        fcntl.fcntl(file.fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:  # EACCES: not the owner; EAGAIN: open for writing elsewhere; EINVAL/ENOLCK: no leases here
        return False
    _leased[file.fd] = weakref.ref(file)
    return True


def _install_handler() -> bool:
    """The lease-break handler for SIGIO, installed before any lease is taken (SIGIO's default action ends the
    process); only the main thread can install it."""
    if not _handler:
        if threading.current_thread() is not threading.main_thread():
            return False
        _handler.extend([_on_lease_break, signal.signal(signal.SIGIO, _on_lease_break)])
    return True


def _on_lease_break(signum, frame) -> None:
    if _guarding[0]:
        _guarding[1] = True
    else:
        _notice_breaks()
    previous = _handler[1]
    if callable(previous) and previous is not _on_lease_break:
        previous(signum, frame)


def _notice_breaks() -> None:
    """Another process (or this one) is opening a leased file for writing: read it with pread from now on, say so,
    and let the lease go once no read is in progress (at once if none is: a writer in this very process waits in
    its open, interrupted by this signal, and retries it)."""
    for descriptor, ref in list(_leased.items()):
        file = ref()
        with contextlib.suppress(OSError):
            if file is None or fcntl.fcntl(descriptor, fcntl.F_GETLEASE) == fcntl.F_RDLCK:
                continue
        if file is not None:
            file.view, file.changed = None, True
        _leased.pop(descriptor, None)
        _broken.append(descriptor)
    _breaks[0] += 1
    start_reading()
    stop_reading()
