"""How much memory this process may use, how much it uses, and giving freed memory back to the OS.

glibc keeps freed heap memory for reuse, in one arena per thread that allocated (up to 8 per core):
a web server whose worker threads each build arrays grows arenas that are never returned.
`configure_allocator` caps the arenas (before the threads start), `trim` hands the free pages of
every arena back (`malloc_trim`); the engine calls it after 10 s of quiet, and once a minute under load. bench/soak.py
measures the effect (bench/README.md).

It also keeps a pass's big temporaries in the heap: a class's pass makes results of a few MB each (30 rows of
50,257 probabilities, their float64 cumulative sums, ...), which glibc maps afresh and unmaps, or hands back as a
heap's top shrinks, so that the next pass faults the same pages in again (thousands a pass: ~15 ms of a quiet
~125 ms 30-row pass). Tuned, blocks below `MMAP_THRESHOLD` come from the heap, up to `TRIM_THRESHOLD` of free heap
stays mapped while the server is busy (`trim` returns it once the server is quiet), and there is one arena: with
fixed thresholds a second one (a thread's, whose heaps are at most 64 MB) still faulted a small model's passes in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from pathlib import Path

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its moving threshold: bigger blocks are mapped and unmapped
TRIM_THRESHOLD = 128 << 20


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


# GPT2VIZ_ALLOCATOR=default leaves glibc as it is (no arena cap, its own moving thresholds, no trimming): the comparison.
TUNED = os.environ.get("GPT2VIZ_ALLOCATOR", "tuned") != "default"


def configure_allocator(arenas: int = 1) -> bool:
    """Cap glibc's malloc arenas and fix its mmap and trim thresholds (False where there is no glibc). Call
    before starting threads."""
    if not (TUNED and _LIBC is not None and hasattr(_LIBC, "mallopt")):
        return False
    return all([_LIBC.mallopt(M_ARENA_MAX, arenas), _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)])


def trim() -> bool:
    """Return the free memory of every malloc arena to the OS (False where there is no glibc)."""
    return bool(TUNED and _LIBC is not None and hasattr(_LIBC, "malloc_trim") and _LIBC.malloc_trim(0))


def freeze_startup_objects() -> int:
    """Collect, then move every object alive now (the modules, the models, the page's blocks: a million or so) out of
    the garbage collector's reach; returns how many. Call once the server is built. Python's full collections then
    visit only what was made since: under a class's load they took 135-193 ms each, on the engine's thread or on
    another holding the interpreter lock, a pass's length more than once a minute. What is frozen is never collected
    (a model is freed by the collector, not by reference counts): call it only when what is alive is to live as long
    as the server (the default model, which `Models` never drops, is the only one loaded by then)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


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
