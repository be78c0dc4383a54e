"""The session store's budget comes from the machine's memory and holds a class; freed memory goes back."""

import numpy as np

from gpt2viz import controller as c
from gpt2viz import memory


def test_the_limit_and_the_resident_size_are_read_from_the_system():
    limit, resident = memory.memory_limit(), memory.resident_bytes()
    assert 256 << 20 < limit < 1 << 50
    assert 10 << 20 < resident < limit


def test_a_16_gb_machine_holds_40_full_gpt2_small_sessions(monkeypatch):
    monkeypatch.setattr(c, "memory_limit", lambda: 16 << 30)
    monkeypatch.delenv("GPT2VIZ_SESSIONS_MAX_BYTES", raising=False)
    store = c.Sessions(models=None)
    # One gpt2-small session at its full context of 1024 tokens: the KV cache (12 layers, keys and values,
    # 768 floats per position) and the recorded residual stream (13 rows) and embeddings (2 rows).
    kv = 12 * 2 * 1024 * 768 * 4
    records = (13 + 2) * 1024 * 768 * 4
    assert store.max_bytes // (kv + records) >= 40 and store.max_sessions >= 40


def test_trim_hands_freed_heap_back():
    """Free 90% of ~800 MB of small heap blocks, every tenth kept: the holes stay resident until trimmed."""
    blocks = [np.ones(2_000, dtype=np.float64) for _ in range(50_000)]  # 16 KB each: heap, not mmap
    kept = blocks[::10]
    del blocks
    holed = memory.resident_bytes()
    assert memory.trim()  # glibc Linux, where the app runs
    assert memory.resident_bytes() < holed - (300 << 20)
    assert len(kept) == 5_000
