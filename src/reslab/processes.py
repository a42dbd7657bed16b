"""Child processes that never outlive the process that started them (ablation workers, data-prepare workers)."""

from __future__ import annotations

import os
import signal
import threading
import time

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """In a worker process: exit when `parent` (the pid that started it) dies, even by kill -9, instead of working
    on and idling. Linux tells the worker at once (PR_SET_PDEATHSIG); elsewhere a thread notices within a second."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
