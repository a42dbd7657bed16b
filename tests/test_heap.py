"""Processes that reslab owns and that train (the `reslab` command's own, the ablation's workers) keep freed memory
in their heap for the next step (glibc), unless the user tuned malloc; a program using reslab is left alone."""

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
from reslab.heap import tune_malloc
print(mapped(8), tune_malloc(), mapped(16))  # glibc's own threshold grows to 8 MiB after the first
"""

# The same question after a real `reslab train`: as the command runs it (main() reading sys.argv, in this process),
# called by a program as main([...]), or after using reslab as a library.
AFTER = PROBE.split("from reslab.heap")[0] + """
import sys
from reslab.cli import main
mode, text, out = sys.argv[1:4]
train = ["train", "--model", "tiny", "--steps", "1", "--batch", "2", "--context", "8", "--data", text, "--out", out,
         "--no-progress"]
if mode == "command":
    sys.argv = ["reslab", *train]
    assert main() == 0
elif mode == "program":
    assert main(train) == 0
else:
    import reslab
    reslab.build_model("tiny", residual="pre")
print(mapped(16))
"""

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="malloc tuning applies to glibc only")


def probe(*args: str, code: str = PROBE, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", code, *args], env={**clean, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@glibc
def test_a_worker_keeps_freed_memory_in_its_heap():
    assert probe() == ["1", "True", "0"]  # mmapped by default; from the heap once tuned


@glibc
def test_the_users_malloc_settings_win():
    assert probe(MALLOC_ARENA_MAX="2") == ["1", "False", "1"]


def after(mode: str, tmp_path, **env: str) -> str:
    text = tmp_path / "text.txt"
    text.write_text("a small corpus of plain words, repeated. " * 40)
    return probe(mode, str(text), str(tmp_path / "run"), code=AFTER, **env)[-1]


@glibc
def test_the_reslab_command_tunes_its_own_process(tmp_path):
    assert after("command", tmp_path) == "0"  # from the heap


@glibc
@pytest.mark.parametrize("mode", ["program", "library"])
def test_a_program_using_reslab_keeps_its_allocator(mode, tmp_path):
    assert after(mode, tmp_path) == "1"  # glibc's default: mmapped


@glibc
def test_glibc_malloc_tunables_win(tmp_path):
    assert after("command", tmp_path, GLIBC_TUNABLES="glibc.malloc.arena_max=2") == "1"
