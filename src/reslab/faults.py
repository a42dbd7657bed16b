"""Failpoints: named places where the fault-injection tests make a real fault happen, deterministically.

Off unless the environment sets `RESLAB_FAILPOINTS`, a comma list of `NAME[@N]=ACTION`: the N-th time (default
the first) the code passes failpoint NAME, ACTION happens there:

    kill    SIGKILL this process (nothing runs after it: no handler, no cleanup; as `kill -9`)
    sigint  send this process SIGINT (as Ctrl-C in its terminal)
    stop    SIGSTOP this process (as Ctrl-Z): a test then sends what it wants and SIGCONT, at a known moment
    enospc  raise OSError(ENOSPC) (as a full disk)

Names: `write:FILE` (inside an atomic write of FILE: the temp file is written, not yet renamed), `append:FILE`
(a whole line appended, then cut to its first half, as a crash in its write leaves it), `step` (inside a step: after
backward, before the optimizer update), `eval` (inside an evaluation), `checkpoint` (before a checkpoint is
written). N counts passes in this process, not training steps:
`step@7=kill` kills the 7th step this process runs (step 7 of a fresh run; a resumed run counts from its restart).

    RESLAB_FAILPOINTS="write:checkpoint.safetensors@2=kill" reslab train ...
    RESLAB_FAILPOINTS="step@2=kill" reslab train --resume RUN

This is how the suite lands inside a write or an evaluation every time, instead of hoping a sleep does.
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter
from collections.abc import Callable

_hits: Counter[str] = Counter()


def _armed() -> dict[str, tuple[int, str]]:
    armed = {}
    for item in filter(None, (part.strip() for part in os.environ.get("RESLAB_FAILPOINTS", "").split(","))):
        name, _, action = item.rpartition("=")
        name, _, count = name.partition("@")
        armed[name] = (int(count or 1), action)
    return armed


def failpoint(name: str, before: Callable[[], None] | None = None) -> None:
    """Make the armed fault happen if this is its moment; a no-op (one dict lookup) when nothing is armed.
    `before` runs first, only then: it leaves the state the fault should find (e.g. half of a line written)."""
    if "RESLAB_FAILPOINTS" not in os.environ:
        return
    armed = _armed().get(name)
    if armed is None:
        return
    _hits[name] += 1
    if _hits[name] != armed[0]:
        return
    action = armed[1]
    if before is not None:
        before()
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "sigint":
        os.kill(os.getpid(), signal.SIGINT)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as the OS raises it from a write: no file name
    else:
        raise ValueError(f"RESLAB_FAILPOINTS: unknown action {action!r} for {name!r}")
