"""The models, the sessions and the engine in a process of their own (`app.py`'s default on the CPU;
`--engine-process auto|on|off`, `hardware.engine_process`).

Why: in one process, the web server's threads (Gradio's event loop, its per-message work) and the engine's
loop share Python's interpreter lock, and a pass of many small torch ops waits for the lock at each of
them (bench/README.md, "Where the time goes"). Here the web process only forwards each use case of the
`Controller` with its (plain, picklable) arguments and receives its `Page`, whose figures come as recipes
(`controller.recipe`) and are drawn in the web process (`Page.build`). A stream comes back page by page;
closing it on the web side (Stop, or the browser gone) closes it in the worker.

Messages on one pipe, pickled: ("call", id, target, args, kwargs), ("cancel", id) to the worker;
("ok" | "item" | "end" | "err", id, payload) back.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import multiprocessing
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """The worker process failed a call outside the Controller's own error handling, or is gone."""


GONE = "the engine process is gone"


def _serve(conn, default: str | None, device: str, dtype_name: str) -> None:
    import torch  # noqa: PLC0415 - the worker's own imports

    from . import controller as c  # noqa: PLC0415
    from .hardware import release_openmp_workers  # noqa: PLC0415
    from .memory import configure_allocator, freeze_startup_objects  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:engine:%(name)s:%(message)s")  # a spawned process logs nothing until told
    configure_allocator()
    c.DEFER_BUILD = True  # figures stay recipes: the web process draws them
    models = c.Models(default=default, device=device, dtype=getattr(torch, dtype_name))
    sessions = c.Sessions(models)
    sessions.warm()  # the memory a first class's pass works in (controller.py, `Sessions.warm`)
    ctl = c.Controller(models, sessions)
    targets = {"ctl": ctl, "sessions": sessions}
    lock = threading.Lock()
    cancelled: set[int] = set()

    def send(*message) -> None:
        with lock:
            conn.send(message)

    def run(call_id: int, target: str, args, kwargs) -> None:
        try:
            if target == "model_cfg":
                result = models.get(*args).cfg
            else:
                owner, name = target.split(".")
                result = getattr(targets[owner], name)(*args, **kwargs)
            if inspect.isgenerator(result):
                try:
                    for item in result:
                        if call_id in cancelled:
                            break
                        send("item", call_id, item)
                finally:
                    result.close()
                send("end", call_id, None)
            else:
                send("ok", call_id, result)
        except BaseException as e:  # noqa: BLE001 - reported to the caller, one line in the log
            log.warning("worker call %s failed: %s: %s", target, type(e).__name__, e)
            send("err", call_id, f"{type(e).__name__}: {e}")
        finally:
            cancelled.discard(call_id)

    freeze_startup_objects()
    release_openmp_workers()  # this thread has loaded the model; the engine's runs it (hardware.py)
    pool = ThreadPoolExecutor(max_workers=256, thread_name_prefix="call")
    send("ready", 0, {"names": models.names(), "default": models.default, "notice": models.notice})
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "call":
            pool.submit(run, *message[1:])
        elif message[0] == "cancel":
            cancelled.add(message[1])


@contextlib.contextmanager
def _main_script_hidden():
    """A spawned process first runs the parent's main script (as `__mp_main__`) when it can find it: app.py would
    bring Gradio, pandas and plotly (~120 MB and seconds of start) into a process that needs none of them."""
    main = sys.modules["__main__"]
    kept = {name: main.__dict__[name] for name in ("__file__", "__spec__") if name in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None  # `python -m app` would name it by its module
    try:
        yield
    finally:
        main.__dict__.update(kept)


class Worker:
    """The web process's end: starts the worker, sends calls, routes the answers to their callers, and starts
    a new worker when one ends (killed for memory, crashed): the calls it was running fail with `WorkerError`,
    later calls wait for the new one, whose empty session store rebuilds each text from its page's state."""

    def __init__(self, default: str | None, device: str = "cpu", dtype_name: str = "float32", timeout: float = 600) -> None:
        self._args, self.timeout = (default, device, dtype_name), timeout
        self._ids = itertools.count(1)
        self._waiting: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._closing = False
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        conn, child = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(child, *self._args), daemon=True, name="gpt2viz-engine")
        with _main_script_hidden():
            process.start()
        child.close()  # the worker's end lives in the worker only, so that its death reaches `_read` as end of file
        try:
            if not conn.poll(self.timeout):
                raise WorkerError("the engine process did not start")
            kind, _, info = conn.recv()
            if kind != "ready":
                raise WorkerError(f"the engine process failed to start: {info}")
        except (EOFError, OSError, WorkerError) as e:
            process.kill()
            process.join(timeout=10)
            conn.close()
            if isinstance(e, WorkerError):
                raise
            raise WorkerError(f"the engine process ended while starting (exit code {process.exitcode})") from e
        self.conn, self.process, self.info = conn, process, info
        threading.Thread(target=self._read, args=(conn, process), daemon=True, name="worker-reader").start()
        self._ready.set()

    def _read(self, conn, process) -> None:
        while True:
            try:
                kind, call_id, payload = conn.recv()
            except (EOFError, OSError):
                break
            q = self._waiting.get(call_id)
            if q is not None:
                q.put((kind, payload))
        if not self._closing:  # closed for good: later calls fail at once on the dead pipe instead of waiting
            self._ready.clear()
        for q in list(self._waiting.values()):  # its callers hear at once, before the process is reaped
            q.put(("err", GONE))
        process.join(timeout=5)
        if not self._closing:
            log.warning("the engine process ended (exit code %s); starting a new one", process.exitcode)
            self._restart()

    def _restart(self) -> None:
        delay = 1.0
        while not self._closing:
            try:
                self._start()
            except WorkerError as e:
                log.warning("%s; trying again in %.0f s", e, delay)
                time.sleep(delay)
                delay = min(2 * delay, 60.0)
                continue
            self.restarts += 1
            log.info("a new engine process is ready (restart %d)", self.restarts)
            return

    def close(self) -> None:
        """End the worker for good (no restart)."""
        self._closing = True
        self.process.kill()
        self.process.join(timeout=10)

    def _send(self, *message) -> None:
        with self._lock:
            self.conn.send(message)

    def _open(self, target: str, args, kwargs) -> tuple[int, queue.Queue]:
        if not self._ready.wait(self.timeout):
            raise WorkerError(GONE)
        call_id, q = next(self._ids), queue.Queue()
        self._waiting[call_id] = q
        try:
            self._send("call", call_id, target, args, kwargs)
        except OSError:  # it ended since: `_read` is starting a new one
            self._waiting.pop(call_id, None)
            raise WorkerError(GONE) from None
        return call_id, q

    def call(self, target: str, *args, **kwargs):
        call_id, q = self._open(target, args, kwargs)
        try:
            kind, payload = q.get()
        finally:
            self._waiting.pop(call_id, None)
        if kind == "err":
            raise WorkerError(payload)
        return payload

    def stream(self, target: str, *args, **kwargs):
        call_id, q = self._open(target, args, kwargs)
        done = False
        try:
            while True:
                kind, payload = q.get()
                if kind == "item":
                    yield payload
                elif kind == "end":
                    done = True
                    return
                else:
                    done = True
                    raise WorkerError(payload)
        finally:
            if not done:
                with contextlib.suppress(OSError):
                    self._send("cancel", call_id)
            self._waiting.pop(call_id, None)


class RemoteController:
    """The `Controller`'s use cases, run in the worker; each `Page` drawn here (`Page.build`). A call the worker
    could not finish (it ended: `Worker` starts another) comes back as a page that says so and keeps the
    page's state, from which the new worker rebuilds the text on the next action."""

    STREAMS = ("stream",)
    NOT_PAGES = {"share_link": "", "stop": None, "cancel": None}  # what these give when the worker fails them

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self.STREAMS:
            def streamed(*args, **kwargs):
                state = args[0] if args else None
                try:
                    for page in self.worker.stream(f"ctl.{name}", *args, **kwargs):
                        state = getattr(page, "state", state)
                        yield page.build() if hasattr(page, "build") else page
                except WorkerError as e:
                    yield self._failed(name, state, e)
            return streamed

        def called(*args, **kwargs):
            try:
                result = self.worker.call(f"ctl.{name}", *args, **kwargs)
            except WorkerError as e:
                return self._failed(name, args[0] if args else None, e)
            return result.build() if hasattr(result, "build") else result
        return called

    def _failed(self, name: str, state, error: WorkerError):
        from .controller import Page, new_state, warn  # noqa: PLC0415 - the controller's page, on the web side

        log.warning("%s failed in the engine process: %s", name, error)
        if name in self.NOT_PAGES:
            return self.NOT_PAGES[name]
        if str(error) == GONE:
            message = "The model's process stopped and a new one is starting: press again (your text is kept)."
        else:
            message = "Something went wrong in the model's process; please try again."
        state = state if isinstance(state, dict) else new_state(self.worker.info["default"])
        return Page(state, status=warn(message), warning=True)


class RemoteModels:
    """What the page's layout asks of the models (names, the default, the notice, a model's shape)."""

    def __init__(self, worker: Worker, tokenizer) -> None:
        self.worker, self.tokenizer = worker, tokenizer
        self.default, self.notice = worker.info["default"], worker.info["notice"]
        self._names = worker.info["names"]

    def names(self) -> list[str]:
        return list(self._names)

    def get(self, name: str):
        return _Shape(self.worker.call("model_cfg", name))


class _Shape:
    def __init__(self, cfg) -> None:
        self.cfg = cfg


class RemoteSessions:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def drop(self, key) -> None:
        with contextlib.suppress(WorkerError):  # a new worker has no such session
            self.worker.call("sessions.drop", key)
