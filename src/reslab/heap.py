"""The process's heap: keep freed memory for the next training step instead of handing it back to the kernel.

With glibc's defaults, a training step's short-lived buffers of a few MiB (bf16 autocast's weight and activation
copies above all) are served by mmap, returned to the kernel when freed, and faulted back in, zeroed, on the next
step. On nanoGPT's CPU model under bf16 that costs 10-16% of a step's time (BENCHMARKS.md, "With the heap kept").
`tune_malloc` raises glibc's thresholds so those buffers stay in the heap.

Only processes reslab owns are tuned: the `reslab` command's own process (the console script or `python -m reslab`,
not a program calling `reslab.cli.main`) when it trains (`train`, `bench`, `ablate`, `reproduce`), and the
ablation's workers. A program that imports reslab keeps its allocator as it is. The user's own malloc settings win:
any `MALLOC_*_` variable, or a `glibc.malloc.*` tunable in GLIBC_TUNABLES. Elsewhere than glibc nothing changes.
"""

from __future__ import annotations

import os

# glibc mallopt parameter numbers, and the values set, each tried in turn: blocks up to 256 MiB come from the heap
# (older glibc accepts at most 32 MiB, its own dynamic ceiling), up to 256 MiB of freed heap is kept, and the heap
# grows 64 MiB at a time.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
TRAINING_MALLOC = {M_MMAP_THRESHOLD: (256 << 20, 32 << 20), M_TRIM_THRESHOLD: (256 << 20,), M_TOP_PAD: (64 << 20,)}


def tune_malloc() -> bool:
    """Keep freed memory in this process's heap (glibc only). Returns whether every setting took."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(name.startswith("MALLOC_") for name in os.environ) or "glibc.malloc." in tunables:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        taken = [any(libc.mallopt(param, value) == 1 for value in values) for param, values in TRAINING_MALLOC.items()]
    except (OSError, AttributeError):
        return False
    return all(taken)
