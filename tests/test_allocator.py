"""``allocator.keep_freed_memory``: glibc keeps large freed blocks in the heap (what ``loramix`` sets for every command).

Checked through glibc's own counters (``mallinfo2``): a 16 MB block is mmapped (``hblkhd`` grows) with the
defaults, and comes from the heap once the setting is made; the user's opt-out leaves the defaults.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")

# glibc's counters and a 16 MB malloc: ``mmapped_by_a_16mb_block()`` is how many bytes it added to the mmapped total
LIBC = """
import ctypes, sys
from loramix.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p

def mmapped_by_a_16mb_block():
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(16 << 20)
    grew = libc.mallinfo2().hblkhd - before
    libc.free(ctypes.c_void_p(block))
    return grew
"""
# Prints whether the setting was made (after keep_freed_memory() when asked) and that growth.
MMAPPED_BY_A_16MB_BLOCK = LIBC + """
set_ = keep_freed_memory() if sys.argv[1] == "set" else None
print(set_, mmapped_by_a_16mb_block())
"""
# ``python -m loramix.demo``'s own entry point, its run replaced by the measurement.
DEMO_ENTRY = LIBC + """
import loramix.demo

loramix.demo.run = lambda args: print(mmapped_by_a_16mb_block())
sys.exit(loramix.demo.main(["--output-dir", sys.argv[1]]))
"""


def mmapped(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", MMAPPED_BY_A_16MB_BLOCK, mode], env={**clean, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


def test_a_large_block_comes_from_the_heap_once_set_and_is_mmapped_by_default():
    assert mmapped("default")[1] >= 16 << 20
    assert mmapped("set") == ("True", 0)


def test_the_users_choice_wins():
    for env in ({"LORAMIX_KEEP_FREED_MEMORY": "0"}, {"MALLOC_ARENA_MAX": "2"}):
        set_, grew = mmapped("set", **env)
        assert set_ == "False" and grew >= 16 << 20


def test_make_demo_sets_it_too(tmp_path):
    """``make demo`` runs ``python -m loramix.demo``, not the ``loramix`` command: its main makes the setting itself."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LORAMIX_KEEP_FREED_MEMORY"}
    out = subprocess.run([sys.executable, "-c", DEMO_ENTRY, str(tmp_path / "demo")], env=clean, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[-1] == "0"
