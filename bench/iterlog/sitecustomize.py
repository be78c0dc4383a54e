"""Per-iteration timing of the engine's loop inside a running server, for profiling (not imported by the app).

    PYTHONPATH=bench/iterlog ITERLOG=/tmp/iter.log python bench/load.py --harness sse --clients 1 30 30

Python imports `sitecustomize` at startup in every process on the path (the server, and the engine's process
with `--engine-process`); with ITERLOG set, it wraps `Engine._iterate`, `_forward` and `_choose` once
`gpt2viz.engine` is imported and appends a line per iteration: its start (`time.perf_counter`, the same clock
in every process), wall and engine-thread CPU ms, the forward pass and token choice ms, rows read, ready jobs,
calls run, the engine thread's minor page faults (all, in the forward, in the choice) and glibc's main heap after
it (size, free, free top, MB); and a line per idle hook (`Engine._idle`: trim, rehearse, warm). A pass whose wall
exceeds its CPU waited: for the interpreter lock, or for a core the web side held (bench/README.md)."""

import ctypes
import os
import resource
import threading
import time

PATH = os.environ.get("ITERLOG")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap() -> str:
    """glibc's main heap: its size, the free bytes in it, and the free top (what a trim of the top would release), MB."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        m = libc.mallinfo2()
    except (OSError, AttributeError):
        return "heap ?"
    return f"heap {m.arena >> 20} free {m.fordblks >> 20} top {m.keepcost >> 20}"


def _install(out) -> None:
    from gpt2viz import engine as E  # noqa: PLC0415

    iterate, forward, choose = E.Engine._iterate, E.Engine._forward, E.Engine._choose
    now = threading.local()

    def _iterate(self, ready, iteration):
        now.fwd = now.cho = 0.0
        now.ffl = now.cfl = 0
        t0, c0, f0 = time.perf_counter(), time.thread_time(), _faults()
        calls, rows = self.stats["calls"], self.stats["batched_rows"]
        iterate(self, ready, iteration)
        out.write(f"{t0:.4f} wall {1000 * (time.perf_counter() - t0):.1f} cpu {1000 * (time.thread_time() - c0):.1f} "
                  f"fwd {1000 * now.fwd:.1f} choose {1000 * now.cho:.1f} rows {self.stats['batched_rows'] - rows} "
                  f"ready {len(ready)} calls {self.stats['calls'] - calls} flt {_faults() - f0} fflt {now.ffl} cflt {now.cfl} {_heap()}\n")

    def _forward(self, *args):
        t, f = time.perf_counter(), _faults()
        forward(self, *args)
        now.fwd += time.perf_counter() - t
        now.ffl += _faults() - f

    def _choose(self, *args):
        t, f = time.perf_counter(), _faults()
        choose(self, *args)
        now.cho += time.perf_counter() - t
        now.cfl += _faults() - f

    E.Engine._iterate, E.Engine._forward, E.Engine._choose = _iterate, _forward, _choose
    idle = E.Engine._idle

    def _idle(self, quiet):
        t0, f0, before = time.perf_counter(), _faults(), _heap()
        idle(self, quiet)
        out.write(f"{t0:.4f} idle {quiet} wall {1000 * (time.perf_counter() - t0):.1f} flt {_faults() - f0} {before} -> {_heap()}\n")

    E.Engine._idle = _idle


def _wait_for_engine() -> None:
    import sys  # noqa: PLC0415

    while getattr(sys.modules.get("gpt2viz.engine"), "Engine", None) is None:
        time.sleep(0.2)
    time.sleep(0.5)  # the module's body has run to its end
    _install(open(PATH, "a", buffering=1))


if PATH:
    threading.Thread(target=_wait_for_engine, daemon=True, name="iterlog").start()
