"""The session store's budget comes from the machine's memory and holds a class; freed memory goes back."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from gpt2viz import controller as c
from gpt2viz import memory

ROOT = Path(__file__).resolve().parent.parent


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


FAULTS = r"""
import resource, threading, torch
from gpt2viz import memory

memory.configure_allocator()
from gpt2viz import GPT2, GPT2Config, SamplingConfig, load_tokenizer
from gpt2viz.generation import GenerationSession, read_together, step_together
from gpt2viz.model import init_weights

faults = []

def passes():  # on a thread of its own, as the engine's loop
    torch.manual_seed(0)
    model = init_weights(GPT2(GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=256))).eval()
    group = [GenerationSession(model, load_tokenizer(), [464, 2068, 7586, 21831], SamplingConfig(seed=i), record=True)
             for i in range(30)]
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        read_together(group)
        step_together(group, [None] * 30)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

thread = threading.Thread(target=passes)
thread.start()
thread.join()
print(sum(faults[3:]))
"""


def _faults(allocator: str) -> int:
    env = {**os.environ, "GPT2VIZ_ALLOCATOR": allocator, "PYTHONPATH": str(ROOT)}
    return int(subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True).stdout)


def test_the_tuned_allocator_keeps_a_passs_temporaries_mapped_from_one_pass_to_the_next():
    """Thirty sessions of gpt2's shape decoding together, nine passes after three: glibc as it is maps a pass's big
    temporaries afresh or trims them off the heap after each pass, and the next pass faults ~5,000-10,000 pages in
    again; tuned (`configure_allocator`), the heap keeps them for the next pass."""
    default, tuned = _faults("default"), _faults("tuned")
    assert default > 9 * 2_000
    assert tuned < default / 4


def test_the_objects_alive_at_startup_are_out_of_the_collectors_reach():
    """A full collection visits every tracked object: after `freeze_startup_objects` it visits only those made since
    (the server's startup leaves a million or so, which cost each full collection over 100 ms under load)."""
    script = ("import gc, gradio, torch\nfrom gpt2viz import memory\nbefore = len(gc.get_objects())\n"
              "frozen = memory.freeze_startup_objects()\nprint(before, frozen, len(gc.get_objects()))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    before, frozen, after = map(int, subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                                    check=True).stdout.split())
    assert before > 100_000 and frozen > 0.9 * before
    assert after < 1_000


WARM = r"""
import resource, sys, torch
from gpt2viz import memory
from gpt2viz.model import SLABS, KVCache

memory.configure_allocator()
key = (12, 12, 64, 64, torch.float32)  # gpt2's shape: a row of 64 positions is 4.7 MB, a slab 75 MB
donor = KVCache(12)
for layer in range(12):
    donor.append(layer, torch.randn(1, 12, 13, 64), torch.randn(1, 12, 13, 64))
donor.length = 13
if sys.argv[1] == "warm":
    SLABS.warm(key)
memory.trim()  # what the idle server does first: freed heap handed back
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
class_ = [KVCache(12) for _ in range(30)]
for kv in class_:
    kv.copy_from(donor, 13)  # thirty students adopting an example's reading of 13 tokens
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_a_class_starts_its_caches_in_memory_warmed_while_idle():
    """Thirty caches copying a 13-token reading write 64 positions each (the bucket's tail zeroed): ~34,000 pages of
    memory the OS maps when first written (~10 µs each on this project's VMs: most of a class's first pass). Into
    spare slabs `SLABS.warm` wrote while the server was idle, the same copies fault almost nothing."""
    def faults(mode):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return int(subprocess.run([sys.executable, "-c", WARM, mode], env=env, capture_output=True, text=True, check=True).stdout)
    cold, warm = faults("cold"), faults("warm")
    assert cold > 30 * 4.7e6 / 4096 * 0.8
    assert warm < cold / 10


REHEARSE = r"""
import resource, sys, torch
from gpt2viz import memory
memory.configure_allocator()
from gpt2viz.generation import GenerationSession, read_together, rehearse, step_together
from gpt2viz.model import GPT2, GPT2Config
from gpt2viz.sampling import SamplingConfig
from gpt2viz.tokenizer import load_tokenizer

torch.manual_seed(0)
model, tokenizer = GPT2(GPT2Config()).eval(), load_tokenizer()  # gpt2's shape, random weights


def class_(n, first):
    sessions = [GenerationSession(model, tokenizer, list(range(first, first + 13)), SamplingConfig(seed=i), record=True)
                for i in range(n)]
    read_together(sessions)
    return sessions


sessions = class_(30, 100)  # a class, then its texts dropped
for _ in range(3):
    step_together(sessions, [None] * 30)
    read_together(sessions)
del sessions
memory.trim()  # what the idle server does first: freed heap handed back
if sys.argv[1] == "rehearse":
    rehearse(model, tokenizer, 32)
sessions = class_(30, 200)  # the next class's prompts read ...
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps = step_together(sessions, [None] * 30)  # ... and its first choice
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, len(steps))
"""


def test_after_the_idle_trim_a_rehearsal_maps_what_a_class_s_first_choice_needs():
    """The idle hook trims the heap; the next class's first choice (30 rows of 50,257 probabilities, their float64
    sums, ...) then faults thousands of pages in. `generation.rehearse` runs a throwaway pass and choice right after
    the trim: the class's choice then finds its memory mapped."""
    def faults(mode):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", REHEARSE, mode], env=env, capture_output=True, text=True, check=True).stdout
        n, steps = map(int, out.split())
        assert steps == 30
        return n
    cold, rehearsed = faults("cold"), faults("rehearse")
    assert cold > 30 * 50_257 * 4 / 4096  # at least one [30, vocab] float32 result's pages
    assert rehearsed < cold / 4
