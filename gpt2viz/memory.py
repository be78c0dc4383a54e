"""How much memory this process may use, how much it uses, and giving freed memory back to the OS.

glibc keeps freed heap memory for reuse, in one arena per thread that allocated (up to 8 per core):
a web server whose worker threads each build arrays grows arenas that are never returned.
`configure_allocator` caps the arenas (before the threads start), `trim` hands the free pages of
every arena back (`malloc_trim`); the engine calls it when its queue empties. bench/soak.py
measures the effect (bench/README.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

M_ARENA_MAX = -8  # mallopt parameter (malloc.h)


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


# GPT2VIZ_ALLOCATOR=default leaves glibc as it is (no arena cap, no trimming): the soak's comparison.
TUNED = os.environ.get("GPT2VIZ_ALLOCATOR", "tuned") != "default"


def configure_allocator(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (False where there is no glibc). Call before starting threads."""
    return bool(TUNED and _LIBC is not None and hasattr(_LIBC, "mallopt") and _LIBC.mallopt(M_ARENA_MAX, arenas))


def trim() -> bool:
    """Return the free memory of every malloc arena to the OS (False where there is no glibc)."""
    return bool(TUNED and _LIBC is not None and hasattr(_LIBC, "malloc_trim") and _LIBC.malloc_trim(0))


def memory_limit() -> int:
    """Bytes this process may use: the container's cgroup limit if it sets one, else the machine's memory."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 1 << 60:
            return int(value)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resident_bytes() -> int:
    """This process's resident memory (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
