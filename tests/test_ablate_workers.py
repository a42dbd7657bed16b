"""The ablation's worker processes keep freed memory for the next step (glibc), unless the user tuned malloc."""

import os
import platform
import subprocess
import sys

import pytest

# In a fresh interpreter: is a block of several MiB served by mmap (fresh zeroed pages) or by the heap, before and
# after tuning?
PROBE = """
import ctypes
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
def mapped(mib):
    before = libc.mallinfo2().hblks
    block = libc.malloc(mib << 20)
    grew = libc.mallinfo2().hblks - before
    libc.free(ctypes.c_void_p(block))
    return grew
from reslab.ablate.executors import tune_malloc
print(mapped(8), tune_malloc(), mapped(16))  # glibc's own threshold grows to 8 MiB after the first
"""

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="malloc tuning applies to glibc only")


def probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                          check=True)
    return done.stdout.split()


@glibc
def test_a_worker_keeps_freed_memory_in_its_heap():
    assert probe() == ["1", "True", "0"]  # mmapped by default; from the heap once tuned


@glibc
def test_the_users_malloc_settings_win():
    assert probe(MALLOC_ARENA_MAX="2") == ["1", "False", "1"]
