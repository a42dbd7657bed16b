"""The process's heap: keep freed memory for the next training step instead of handing it back to the kernel.

With glibc's defaults, a training step's short-lived buffers of a few MiB (bf16 autocast's weight and activation
copies above all) are served by mmap, returned to the kernel when freed, and faulted back in, zeroed, on the next
step. On nanoGPT's CPU model under bf16 that costs 12-16% of every step (BENCHMARKS.md, "Speed against the peers").
`tune_malloc` raises glibc's thresholds so those buffers stay in the heap.

Only processes reslab owns are tuned: the `reslab` command's own process when it trains (`train`, `bench`,
`ablate`) and the ablation's workers. A program that imports reslab as a library keeps its allocator as it is.
Explicit `MALLOC_*_` environment settings win; elsewhere than glibc nothing changes.
"""

from __future__ import annotations

import os

# glibc mallopt parameter numbers, and the values set: blocks up to 256 MiB come from the heap, up to 256 MiB of
# freed heap is kept, and the heap grows 64 MiB at a time.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
TRAINING_MALLOC = {M_MMAP_THRESHOLD: 256 << 20, M_TRIM_THRESHOLD: 256 << 20, M_TOP_PAD: 64 << 20}


def tune_malloc() -> bool:
    """Keep up to 256 MiB of freed heap in this process (glibc only). Returns whether it did."""
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(param, value) == 1 for param, value in TRAINING_MALLOC.items())
    except (OSError, AttributeError):
        return False
