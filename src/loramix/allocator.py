"""The process's C allocator: ``keep_freed_memory`` (glibc's ``mallopt``), which every ``loramix`` command calls first.

Example:
    >>> from loramix.allocator import keep_freed_memory
    >>> keep_freed_memory()   # True on glibc unless LORAMIX_KEEP_FREED_MEMORY=0 or a MALLOC_* variable is set
    True
"""

from __future__ import annotations

import os
import sys

KEEP_FREED_MEMORY = "LORAMIX_KEEP_FREED_MEMORY"  # 0: leave glibc's allocator settings alone
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Have glibc serve large blocks from the heap and keep freed memory for reuse (``mallopt``); returns
    whether it was set.

    Why: a CPU training step allocates and frees activations of a few MB hundreds of times. With glibc's
    defaults each such block above the mmap threshold goes back to the kernel when freed and is
    page-faulted in again the next time: measured on a 2-core CPU, 11-15% of a SmolLM2-135M training
    step, for PEFT's LoRA and loramix's kinds alike (README, ``loramix bench``). The price: the process
    keeps the memory of its peak instead of returning it between steps. Not set where the user chose
    (any ``MALLOC_*`` variable, or ``LORAMIX_KEEP_FREED_MEMORY=0``), nor outside glibc.
    """
    if (sys.platform != "linux" or os.environ.get(KEEP_FREED_MEMORY, "1") == "0"
            or any(name.startswith("MALLOC_") for name in os.environ)):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl): its own allocator
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
