"""One loop that runs the model for every user: continuous batching across generation sessions.

    engine = Engine()
    for step in engine.generate(session, lock, 30, who=Who("browser-1", "10.0.0.7")):  # thin waiter
        ...
    page = engine.call(session, lock, lambda: draw_views(session), who=...)       # other model work

At batch 1 a decode step streams every weight matrix to compute one row. Here each iteration
stacks the next token of every active generation (and a chunk of any prompt being read) into
one `GPT2.forward_ragged` pass, unembeds the last rows in one product, then lets every session
choose its token with its own settings, seed stream and forced tokens, all rows at once
(`generation.step_together`: each gets what `GenerationSession.step` would give it alone).
Sessions join and leave between iterations. Every other piece of model work (drawing views,
reading a rewound text) is a `call` run on the same thread between iterations, so one budget
covers all of it and Gradio's thread count decides nothing.

Every session gets the same numbers, bit for bit, whoever it is batched with: `forward_ragged`'s
products give a row the same result whatever the other rows, decode rows whose caches share a slab
attend in one product whose result for a row depends only on that row (`model.attend_rows`), and
prompts are read in chunks whose boundaries depend only on the position (tests/test_engine.py). So a
seed replays the same text on a busy server as on an idle one.

A prompt is read once for everyone who starts it: sessions that start the same text in one pass share
its rows (`generation.same_starts`), and one whose prompt another session read earlier takes that
reading (`GenerationSession.adopt_prompt`); both are bit for bit what the session's own pass would give.
A class told to pick one example costs one prompt's reading, not thirty. And a class that presses Generate
together starts in one pass: while its texts are still arriving, the engine waits for the rest (`_gather`).

A pass takes at most `max_batch` generations (64: a class of 60 in one pass, whose products cost less a row
than two passes of 30 do; and a pass's length, which every view waits for, stays bounded).
Fairness: jobs are served least recently served first; prompts are read at most `prefill_tokens`
per iteration in all (up to 4x that while many texts wait for their first token: `prefill_budget`);
calls get as long as the pass took (at least `call_slice`, at least one);
each browser session and each client address has a cap on queued jobs (`Overloaded`). A whole class
often comes from one school's address, so that cap is a class's worth (128: one generation and one
view each for 60 students), well under the server's (512).
One loop serves every loaded model (an iteration batches the sessions of one model): on a
2-core machine two loops would only take turns on the same cores.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .generation import GenerationSession, fresh_key, read_together, step_together, Step

log = logging.getLogger("gpt2viz.engine")
THREAD_NAME = "gpt2viz-engine"  # the one thread that runs the models (and the one with a team of OpenMP workers)


class Overloaded(RuntimeError):
    """A browser session or a client address has too much work queued: the message says which."""


@dataclass(frozen=True)
class Who:
    """Whose work a job is: the browser session (owner) and the client's network address."""

    owner: str = ""
    client: str = ""


@dataclass
class Delivered:
    """One generated token as the engine hands it over: the step and a snapshot of the text then
    (ids and per-token log-probabilities, copied so the waiter never reads the live session)."""

    step: Step
    ids: list[int]
    logprobs: list[float]


_DONE = object()


@dataclass(eq=False)
class _Job:
    session: GenerationSession | None
    lock: threading.Lock | None
    who: Who
    n_tokens: int = 0  # tokens to generate; 0 = only read what is unread
    force: list[int | None] = field(default_factory=list)  # per generated token, None = sample
    fn: Callable[[], object] | None = None  # a call instead of a generation
    rate: float = 0.0  # tokens per second at most (0: as fast as it goes)
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False
    served: int = -1  # the iteration that last served it (new jobs first)
    submitted: float = field(default_factory=time.monotonic)
    next_at: float = 0.0
    done: int = 0
    detached: bool = False  # its waiter has every token; the job only reads the last one (leaving no longer cancels it)


class Generation:
    """The waiter's side of a generation: iterate for `Delivered` tokens; `cancel()` stops it before
    its next token (also when the waiter goes away)."""

    def __init__(self, engine: "Engine", job: _Job) -> None:
        self._engine, self._job = engine, job

    def __iter__(self) -> Iterator[Delivered]:
        try:
            for got in self.batches():
                yield from got
        finally:
            self.cancel()

    def batches(self, every: Callable[[], float] | None = None) -> Iterator[list[Delivered]]:
        """The tokens in the batches they are waited for: each wait returns every token generated meanwhile
        (one at least), so a waiter that is slow to pass them on (a busy web server) sends one message
        for several tokens instead of falling further behind. `every()`: seconds to let pass between two
        batches (the tokens made meanwhile wait for the next one); asked before each."""
        try:
            error, last = None, 0.0
            while error is None:
                got, item = [], self._job.out.get()
                gap = every() if every is not None else 0.0
                deadline = last + gap
                while item is not _DONE:
                    if isinstance(item, BaseException):
                        error = item  # raised after the tokens before it
                        break
                    got.append(item)
                    try:
                        wait = deadline - time.monotonic()
                        item = self._job.out.get(timeout=wait) if wait > 0 else self._job.out.get_nowait()
                    except queue.Empty:
                        break
                if got:
                    last = time.monotonic()
                    yield got
                if item is _DONE:
                    return
            raise error
        finally:
            self.cancel()

    def cancel(self) -> None:
        if not (self._job.cancelled or self._job.detached):
            self._job.cancelled = True
            self._engine._wake()


class Engine:
    """The model loop. Thread-safe; its thread starts with the first job and ends when idle."""

    def __init__(self, max_batch: int = 64, prefill_tokens: int = 128, call_slice: float = 0.05,
                 max_jobs_per_owner: int = 3, max_jobs_per_client: int = 128, max_jobs: int = 512,
                 idle_seconds: float = 30.0, on_idle: Callable[[bool], None] | None = None, max_ahead: int = 8,
                 idle_after: float = 10.0, gather_gap: float = 0.015, gather_max: float = 0.2) -> None:
        self.max_batch, self.prefill_tokens, self.call_slice = max_batch, prefill_tokens, call_slice
        self.gather_gap, self.gather_max = gather_gap, gather_max  # a class's texts arriving together (`_gather`)
        self.max_ahead = max_ahead  # tokens a generation may run ahead of its waiter (who takes them in `batches`)
        self.max_jobs_per_owner, self.max_jobs_per_client, self.max_jobs = max_jobs_per_owner, max_jobs_per_client, max_jobs
        # on_idle(True) once the queue has been empty for `idle_after` s; on_idle(False) every minute under load. Not at
        # once: the memory a class's passes used (and trimming hands back) is what its next request needs again.
        self.idle_seconds, self.on_idle, self.idle_after = idle_seconds, on_idle, idle_after
        self._jobs: list[_Job] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._iteration = itertools.count()
        self.stats = {"iterations": 0, "batched_rows": 0, "calls": 0, "advance_s": 0.0, "calls_s": 0.0, "forward_s": 0.0,
                      "generations_ready": 0, "generations_batched": 0, "prompts_adopted": 0}
        self._prompts: collections.OrderedDict[tuple, weakref.ref] = collections.OrderedDict()  # read prompts, by text
        self.first_token_s: collections.deque[float] = collections.deque(maxlen=1000)  # submitted -> first token, per generation

    # -- the waiters' side --

    def generate(self, session: GenerationSession, lock: threading.Lock, n_tokens: int, who: Who = Who(),
                 force: list[int | None] | None = None, rate: float = 0.0) -> Generation:
        """Generate up to `n_tokens` (stopping early at end-of-text or a full context); `force[i]` is the
        token to take at the i-th step (None: sample). `rate` paces it (tokens per second). A recording session's
        last token is read in the engine's next pass, after the waiter has it: `read` (with the same lock) waits
        for that, and a `call` on the session runs after it."""
        job = _Job(session, lock, who, n_tokens=n_tokens, force=list(force or []), rate=rate)
        self._submit(job)
        return Generation(self, job)

    def read(self, session: GenerationSession, lock: threading.Lock, who: Who = Who(), timeout: float = 120.0) -> None:
        """Read whatever the session has not read yet (a prompt, a replayed text), batched with the others."""
        if session.record and session.unread():
            self._wait(self._submit(_Job(session, lock, who)), timeout)

    def call(self, session: GenerationSession | None, lock: threading.Lock | None, fn: Callable[[], object],
             who: Who = Who(), timeout: float = 120.0):
        """Run `fn()` on the engine's thread while holding `lock` (if any); return its result or raise its exception."""
        return self._wait(self._submit(_Job(session, lock, who, fn=fn)), timeout)

    def _wait(self, job: _Job, timeout: float):
        try:
            item = job.out.get(timeout=timeout)
        except queue.Empty:
            job.cancelled = True
            raise Overloaded("The server is very busy: please try again in a moment.") from None
        if isinstance(item, BaseException):
            raise item
        return None if item is _DONE else item

    def _submit(self, job: _Job) -> _Job:
        with self._cv:
            live = [j for j in self._jobs if not j.cancelled]
            if job.who.owner and sum(j.who.owner == job.who.owner for j in live) >= self.max_jobs_per_owner:
                raise Overloaded("You already have requests waiting: wait for them to finish (or press Stop).")
            if job.who.client and sum(j.who.client == job.who.client for j in live) >= self.max_jobs_per_client:
                raise Overloaded("Too many requests from your network address are waiting: please try again in a moment.")
            if len(live) >= self.max_jobs:
                raise Overloaded("The server is full: please try again in a moment.")
            self._jobs.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=THREAD_NAME, daemon=True)
                self._thread.start()
            self._cv.notify()
        return job

    def generating(self) -> int:
        """How many generations are running (not cancelled)."""
        return sum(1 for j in list(self._jobs) if j.fn is None and j.n_tokens and not j.cancelled)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # -- the loop --

    def _loop(self) -> None:
        last_idle, worked = time.monotonic(), False
        last_report, reported = time.monotonic(), dict(self.stats)
        while True:
            if time.monotonic() - last_report > 30:
                last_report, was, reported = time.monotonic(), reported, dict(self.stats)
                n = reported["iterations"] - was["iterations"]
                if n:
                    waits = sorted(self.first_token_s)
                    self.first_token_s.clear()
                    log.info("engine: %d passes of %.1f rows, %.0f ms each (%.0f ms forward), %d calls (%.0f%% of the time), "
                             "%d jobs queued, %.1f of %.1f ready generations batched per pass; first tokens %s", n, (reported["batched_rows"] - was["batched_rows"]) / n,
                             1000 * (reported["advance_s"] - was["advance_s"]) / n, 1000 * (reported["forward_s"] - was["forward_s"]) / n,
                             reported["calls"] - was["calls"], 100 * (reported["calls_s"] - was["calls_s"]) / 30, len(self._jobs),
                             (reported["generations_batched"] - was["generations_batched"]) / n,
                             (reported["generations_ready"] - was["generations_ready"]) / n,
                             f"p50 {waits[len(waits) // 2]:.2f} s, max {waits[-1]:.2f} s after the request reached the engine ({len(waits)})"
                             if waits else "none")
            with self._cv:
                self._jobs = [j for j in self._jobs if not self._finish_if_cancelled(j)]
                idle = not self._jobs
                if idle:
                    hook = worked and self.on_idle is not None
                    if self._cv.wait_for(lambda: self._jobs, timeout=self.idle_after if hook else self.idle_seconds):
                        continue
                    if not hook:
                        self._thread = None
                        return
                else:
                    now = time.monotonic()
                    ready = [j for j in self._jobs if j.next_at <= now]
                    if not ready:
                        self._cv.wait(timeout=max(0.001, min(j.next_at for j in self._jobs) - now))
                        continue
                    wait = self._gather(ready, now)
                    if wait > 0:
                        self._cv.wait(timeout=wait)
                        continue
            if idle:  # nothing to do for `idle_after` seconds since the last pass
                worked, last_idle = False, time.monotonic()
                self._idle(True)
                continue
            try:
                self._iterate(sorted(ready, key=lambda j: j.served), next(self._iteration))
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("engine iteration failed")
            worked = True
            if self.on_idle is not None and time.monotonic() - last_idle > 60.0:
                last_idle = time.monotonic()
                self._idle(False)

    def _gather(self, ready: list[_Job], now: float) -> float:
        """Seconds to wait before the next pass while a class's texts are still arriving. Thirty students who press
        Generate together reach the engine over ~0.1 s (the web server takes their requests in one by one): a pass
        that starts with the first few costs nearly what a pass of thirty does (at a few rows a pass streams every
        weight for little work) and the rest wait for it. So while every ready job is a generation started less than
        `gather_max` ago (or a finished text's last read) and there are two at least (a burst, not one student: one
        alone never waits), the pass waits until none has arrived for `gather_gap`, at most until `gather_max` after
        the first of them."""
        starting = [j for j in ready if not j.detached]  # (a text's last read rides along: its waiter has every token)
        if len(starting) < 2 or any(j.fn is not None or now - j.submitted > self.gather_max for j in starting):
            return 0.0
        first, last = min(j.submitted for j in starting), max(j.submitted for j in starting)
        return min(last + self.gather_gap, first + self.gather_max) - now

    def _idle(self, idle: bool) -> None:
        try:
            self.on_idle(idle)
        except Exception:  # noqa: BLE001 - the loop must survive anything
            log.exception("idle hook failed")

    def _finish_if_cancelled(self, job: _Job) -> bool:
        if job.cancelled:
            job.out.put(_DONE)
        return job.cancelled

    def _finish(self, job: _Job, result=_DONE) -> None:
        if result is not _DONE:
            job.out.put(result)
        if job.fn is None or result is _DONE:
            job.out.put(_DONE)
        with self._cv:
            if job in self._jobs:
                self._jobs.remove(job)

    def _iterate(self, ready: list[_Job], iteration: int) -> None:
        gens = [j for j in ready if j.fn is None]
        calls = [j for j in ready if j.fn is not None]
        started = time.monotonic()
        if gens:
            self._advance(gens, iteration)
            self.stats["advance_s"] += time.monotonic() - started
            # and the calls that came during the pass (a Step's views, asked for as soon as its token was handed over)
            known = set(map(id, calls))
            calls += [j for j in list(self._jobs) if j.fn is not None and not j.cancelled and id(j) not in known]
        # Calls (views, rewinds) get as long as the pass took, at least `call_slice`: under load, half the
        # loop's time goes to the pages that wait for them, half to the tokens.
        slice_s = max(self.call_slice, time.monotonic() - started)
        started = time.monotonic()
        reading = {id(j.session) for j in list(self._jobs) if j.detached and not j.cancelled}
        for job in calls:
            if time.monotonic() - started > slice_s and job is not calls[0]:
                break
            if job.session is not None and id(job.session) in reading:
                continue  # the last token of its generation is read in a pass first: the call sees the text read
            if job.lock is not None and not job.lock.acquire(blocking=False):
                continue  # its session is busy elsewhere: next iteration
            job.served = iteration
            began = time.monotonic()
            try:
                result = job.fn()
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                result = e
            finally:
                if job.lock is not None:
                    job.lock.release()
            self.stats["calls"] += 1
            self.stats["calls_s"] += time.monotonic() - began
            self._finish(job, result)

    def _advance(self, gens: list[_Job], iteration: int) -> None:
        """One batched forward pass over the generations of one model, then each chooses its token."""
        model = gens[0].session.model
        batch: list[tuple[_Job, list[int]]] = []
        budget = self.prefill_budget(gens)
        seen: set = set()
        sessions: set[int] = set()
        try:
            for job in gens:
                if len(batch) >= self.max_batch:
                    break
                if job.session.model is not model or (job.n_tokens and job.out.qsize() >= self.max_ahead):
                    continue  # another model's turn comes next; or the waiter has not taken its last tokens yet
                if id(job.session) in sessions:  # another job of this text is in the pass: it reads what is unread
                    if job.detached:
                        self._finish(job)  # a generation's last read, which the next request of its text makes
                    continue
                if not job.lock.acquire(blocking=False):
                    continue
                unread = job.session.unread()
                if len(unread) > 1 and self._adopt(job.session):
                    unread = []  # its prompt was read for another session: it chooses its token this iteration
                elif len(unread) > 1:
                    # Chunks end at multiples of `prefill_tokens`, whatever else runs: a session's passes,
                    # and so its numbers, never depend on the load.
                    unread = unread[: self.prefill_tokens - len(job.session.records) % self.prefill_tokens]
                    fresh = fresh_key(job.session, unread)
                    if fresh is None or fresh not in seen:  # the same text read afresh again costs nothing (`same_starts`)
                        if budget <= 0:
                            job.lock.release()
                            continue
                        budget -= len(unread)
                    if fresh is not None:
                        seen.add(fresh)
                batch.append((job, unread))
                sessions.add(id(job.session))
                job.served = iteration
            self.stats["generations_ready"] += len(gens)
            self.stats["generations_batched"] += len(batch)
            reading = [(job, ids) for job, ids in batch if ids and job.session.record]
            later: list = []
            if reading:
                began = time.monotonic()
                self._forward(model, reading, later)
                self.stats["forward_s"] += time.monotonic() - began
            self._choose([job for job, _ in batch])
            for score in later:  # the prompts' log-probabilities, once the tokens are on their way (`read_together`)
                try:
                    score()
                except Exception:  # noqa: BLE001 - the tokens are delivered; the strip shows those unscored
                    log.exception("scoring the prompts failed")
        finally:
            for job, _ in batch:
                job.lock.release()

    def prefill_budget(self, gens: list[_Job]) -> int:
        """Prompt tokens to read in this pass: a chunk (`prefill_tokens`) for each text waiting for its first token,
        at most 4 chunks. A class that starts 30 texts at once gets its first tokens in fewer, longer passes; one
        long prompt alone still takes a chunk a pass, between the others' decode steps. Chunk boundaries do not
        move (they are multiples of `prefill_tokens`), so no session's numbers change."""
        waiting = sum(1 for j in gens if j.fn is None and not j.done and len(j.session.unread()) > 1)
        return self.prefill_tokens * min(4, max(1, waiting))

    def _forward(self, model, reading: list[tuple[_Job, list[int]]], later: list) -> None:
        try:
            rows = read_together([job.session for job, _ in reading], [ids for _, ids in reading], later)
        except Exception as e:  # noqa: BLE001
            for job, _ in reading:
                self._finish(job, e)
            raise
        self.stats["iterations"] += 1
        self.stats["batched_rows"] += rows
        for job, _ in reading:
            s = job.session
            if s._prompt_read is not None and len(s.records) == len(s.prompt_ids):  # its prompt, just read
                key = (id(s.model), tuple(s.prompt_ids))
                self._prompts[key] = weakref.ref(s)
                self._prompts.move_to_end(key)
                while len(self._prompts) > 256:
                    self._prompts.popitem(last=False)

    def _adopt(self, session: GenerationSession) -> bool:
        """A session that has read nothing takes the reading of its prompt from a session that read the same
        prompt in an earlier pass (`GenerationSession.adopt_prompt`): a class on one example reads it once."""
        if not session.record or session.plan or len(session.records):
            return False
        ref = self._prompts.get((id(session.model), tuple(session.prompt_ids)))
        donor = ref() if ref is not None else None
        if donor is None or not session.adopt_prompt(donor):
            return False
        self.stats["prompts_adopted"] += 1
        return True

    def _choose(self, jobs: list[_Job]) -> None:
        """After the pass: each generation takes its next token (all of them in one `step_together`); a read
        job is done once nothing is unread. A session that does not record (it captures attention and the
        lens per step) reads solo. Hooks belong to the thread that attached them (`hooks.py`), so none
        attached by a waiter runs here: whatever must change a session's forward pass has to travel with
        the session."""
        stepping: list[tuple[_Job, int | None]] = []
        for job in jobs:
            s = job.session
            try:
                if job.cancelled:
                    self._finish(job)
                    continue
                if not s.record:
                    s.read()
                if s.unread():
                    continue  # a prompt still being read, a chunk per iteration
                if job.n_tokens == 0 or s.room_left <= 0:
                    self._finish(job)
                    continue
                force = job.force[job.done] if job.done < len(job.force) else None
                s._check_force(force)
                stepping.append((job, force))
            except Exception as e:  # noqa: BLE001 - handed to the waiter
                self._finish(job, e)
        if not stepping:
            return
        try:
            steps = step_together([job.session for job, _ in stepping], [force for _, force in stepping])  # no forward here
        except Exception as e:  # noqa: BLE001
            for job, _ in stepping:
                self._finish(job, e)
            return
        for (job, _), step in zip(stepping, steps):
            s = job.session
            if job.done == 0:
                self.first_token_s.append(time.monotonic() - job.submitted)
            job.done += 1
            job.out.put(Delivered(step, s.ids, list(s.records.logprobs)))
            if job.rate:
                job.next_at = time.monotonic() + 1.0 / job.rate
            if step.finish_reason is not None or job.done >= job.n_tokens or s.room_left <= 0:
                if s.record:
                    # Read the last token in the next batched pass (the page drawn next needs it read), but let the
                    # waiter go now: its last token need not wait a pass, and the views it asks for next run
                    # after that pass (calls come after each pass), one iteration sooner than if it waited.
                    job.n_tokens, job.detached = 0, True
                    job.out.put(_DONE)
                else:
                    self._finish(job)
