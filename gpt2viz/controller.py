"""What the web app does, without the web: models, per-user sessions, and the views they show.

`app.py` only lays out Gradio components and wires them to these functions. Everything
here takes and returns plain values (dicts, lists, strings, plotly figures), so it is
tested directly. All state lives in two places: the small per-user `state` dict (which
Gradio keeps per browser session) and the `Sessions` store below, which holds each user's
heavy generation session (KV cache, captures) and can always be rebuilt from `state`.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import logging
import math
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import export, hardware, plots
from .handout import render as render_handout
from .compare import coupled_report
from .engine import THREAD_NAME as ENGINE_THREAD, Engine, Generation, Overloaded, Who
from .interventions import describe
from .share import SETTING_NAMES as SHARE_SETTINGS
from .share import LENS_MODES, STRIP_COLOURS, Shared, ShareLinkError  # the view's modes (a link carries them)
from .share import decode as decode_link
from .share import encode as encode_link
from .why import why_views
from .experiments import (Experiment, TargetError, bars_view, head_label, parse_targets, strips_html, summary, surprisal_view,
                          target_choices)
from .generation import GenerationSession, Step, rehearse
from .loading import BUNDLED_MODELS, HUB_MODELS, CheckpointError, HubUnavailableError, hub_reachable, load_model, resolve_checkpoint
from .memory import memory_limit, trim
from .model import GPT2, SLABS, SPARE_ROWS, ContextLengthError, slab_capacity
from .attribution import commitment, commitment_layers
from .roles import ROLE_THRESHOLD, head_scores
from .sampling import SamplingConfig
from .tokenizer import encode, load_tokenizer, token_strings

log = logging.getLogger("gpt2viz")

OFFLINE_MODEL = "tiny-shakespeare"
MAX_PROMPT_CHARS = 20_000
TOP_N = 10
STREAM_ALONE, STREAM_GAP = 4, 0.02  # `Controller._stream_gap`: streams of up to 4 texts send every token; then 20 ms each


class UserError(ValueError):
    """Bad input from a user: the message is shown in the page as it is."""


# --- models ---------------------------------------------------------------------------------


class Models:
    """Models loaded once per process and shared read-only by every user."""

    def __init__(self, default: str | None = None, max_loaded: int = 2, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.device, self.dtype = device, dtype  # hardware.choose_device / choose_dtype
        self._models: OrderedDict[str, GPT2] = OrderedDict()
        self._lock = threading.Lock()
        self.max_loaded = max_loaded
        self.tokenizer = load_tokenizer()
        self.online = hub_reachable()
        self.notice = ""
        self.extra: dict[str, str] = {}  # display name -> path given on the command line
        self.default = self._choose_default(default)
        if device != "cpu" and dtype != torch.float32:
            self.notice += (f" **Half precision.** The models run in {str(dtype).removeprefix('torch.')} on the GPU: "
                            "probabilities can differ from GPT-2's float32 numbers by about a percentage point "
                            "(bench/README.md).")

    def _choose_default(self, requested: str | None) -> str:
        wanted = requested or "gpt2"
        if wanted not in HUB_MODELS and wanted not in BUNDLED_MODELS:
            name = f"local: {Path(wanted).name or wanted}"  # the folder's name, never its path
            self.extra[name] = wanted
            wanted = name
        try:
            self.get(wanted)
            return wanted
        except HubUnavailableError:
            self.notice = (
                f"**Offline mode.** The Hugging Face Hub could not be reached, so `{wanted}` could not be "
                f"downloaded. This page is running **{OFFLINE_MODEL}**, a small GPT-2 trained on Shakespeare "
                f"that ships with gpt2viz. It works the same way as GPT-2, but it only knows Shakespeare."
            )
            self.get(OFFLINE_MODEL)
            return OFFLINE_MODEL

    def names(self) -> list[str]:
        """Models a user can pick: bundled ones always; Hub ones when the Hub is reachable or they are cached."""
        names = list(self.extra)
        for name in HUB_MODELS:
            if not hardware.offered(name, self.device):
                continue  # gpt2-large and gpt2-xl: too slow to be live on a 2-core CPU
            if self.online or name in self._models or self._cached(name):
                names.append(name)
        names += [n for n, path in BUNDLED_MODELS.items() if (path / "config.json").exists()]
        return list(dict.fromkeys([self.default] + names))

    def _cached(self, name: str) -> bool:
        try:
            resolve_checkpoint(name, local_files_only=True)
            return True
        except CheckpointError:
            return False

    def get(self, name: str) -> GPT2:
        with self._lock:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
        if name not in self.extra and name not in HUB_MODELS and name not in BUNDLED_MODELS:
            raise UserError(f"unknown model {name!r}")
        model = load_model(self.extra.get(name, name), local_files_only=not self.online, device=self.device,
                           dtype=self.dtype if self.device != "cpu" else torch.float32)
        if hardware.on_gpu_per_call(name) and name not in hardware.GPU_MODELS:
            hardware.place_for_gpu_calls(name, load_model(self.extra.get(name, name), local_files_only=not self.online),
                                         self.tokenizer)
        if threading.current_thread().name != ENGINE_THREAD:
            hardware.release_openmp_workers()  # a page's thread loaded it; the engine's runs it (hardware.py)
        with self._lock:
            self._models[name] = model
            while len(self._models) > self.max_loaded:
                oldest = next(iter(self._models))
                if oldest == self.default:
                    self._models.move_to_end(oldest)
                    oldest = next(iter(self._models))
                if oldest == name:
                    break
                del self._models[oldest]
        return model


# --- per-user sessions ----------------------------------------------------------------------


@dataclass
class Entry:
    session: GenerationSession
    model_name: str
    lock: threading.Lock  # held by the engine while it works on the session
    generating: Generation | None = None  # the running generation; Stop cancels it
    experiment: Experiment | None = None  # the last run of the Experiment view
    marks: tuple[tuple[int, ...], dict] = ((), {})  # (the text, its strip's decision marks) when last drawn that way

    @property
    def nbytes(self) -> int:
        return self.session.nbytes + (self.experiment.nbytes if self.experiment else 0)


class ViewOrder:
    """Which of one browser session's answers the page may still show: the newest asked for wins.

    A page's events run side by side, so a slow answer (a tab drawn at the newest token) can arrive after a
    quicker one asked for later (a click on a token), and would undo it. Each handler takes a ticket when it
    starts, in the order the browser sent its events; an answer whose ticket is older than one already shown
    is dropped (`may_show` is False). Answers that change the text (Step, Generate) take tickets too, so a view
    asked for before them cannot land after them, but they are always shown. Sessions are forgotten
    least-recently-used beyond `capacity`."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._issued: OrderedDict[str, int] = OrderedDict()
        self._shown: dict[str, int] = {}

    def ticket(self, session: str) -> int:
        with self._lock:
            n = self._issued.pop(session, 0) + 1
            self._issued[session] = n
            while len(self._issued) > self.capacity:
                old, _ = self._issued.popitem(last=False)
                self._shown.pop(old, None)
            return n

    def may_show(self, session: str, ticket: int, *, always: bool = False) -> bool:
        """Whether the answer holding `ticket` may be shown (and, if so, it is the newest shown from now on)."""
        with self._lock:
            if ticket < self._shown.get(session, 0) and not always:
                return False
            if session in self._issued:
                self._shown[session] = max(ticket, self._shown.get(session, 0))
            return True


SESSION_SHARE_OF_MEMORY = 0.4  # of the machine's (or container's) memory, for all users' sessions together


class Sessions:
    """Each user's live generation session, keyed by a random id kept in their state.

    Bounded by count and by bytes (least recently used ones are dropped first; the byte budget is a
    share of this machine's memory, or GPT2VIZ_SESSIONS_MAX_BYTES); a dropped one is rebuilt from
    the user's state (token ids) the next time it is needed. All model work on a session runs on the
    `engine`'s loop, batched with everyone else's.
    """

    def __init__(self, models: Models, max_sessions: int = 256, max_bytes: int | None = None,
                 engine: Engine | None = None) -> None:
        self.models = models
        self.max_sessions = max_sessions
        if max_bytes is None:
            configured = os.environ.get("GPT2VIZ_SESSIONS_MAX_BYTES", "")
            max_bytes = int(configured) if configured.isdigit() else int(SESSION_SHARE_OF_MEMORY * memory_limit())
        self.max_bytes = max_bytes
        self.engine = engine or Engine(on_idle=self._idle)
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._reported = 0.0

    def _idle(self, idle: bool = True) -> None:
        """When the engine has had nothing to do for a while (`idle`), or once a minute under load: hand freed memory
        back to the OS; when idle, then keep the rows the next class's texts start in ready (`warm`)."""
        trim()
        if idle:
            self.warm()

    def warm(self) -> int:
        """Memory the next class's first pass works in, mapped before it comes (app.py calls this at startup, the
        engine's idle hook after trimming): a throwaway pass of `SPARE_ROWS` texts on the default model
        (`generation.rehearse`: the choice's and the products' temporaries), then spare rows of the key-value
        caches' slabs, written (`model.SLABS.warm`; the default model's shape before any text has started): the
        first pass of a class that starts together (every student's copy of an example's reading) then writes into
        memory the OS has mapped already. Returns the slab rows written."""
        model = self.models.get(self.models.default)
        p = next(model.parameters())
        if p.device.type != "cpu":
            return 0
        rehearse(model, self.models.tokenizer, SPARE_ROWS)
        cfg = model.cfg
        return SLABS.warm((cfg.n_layer, cfg.n_head, slab_capacity(1), cfg.d_head, p.dtype))

    def _report(self) -> None:
        """At most every 10 s, a log line with the store's size (bench/soak.py reads it)."""
        now = time.monotonic()
        if now - self._reported > 10:
            self._reported = now
            log.info("sessions: %d live, %d MB (budget %d MB)", len(self), self.nbytes >> 20, self.max_bytes >> 20)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in list(self._entries.values()))

    def _evict(self, keep: Entry) -> None:
        """Drop least recently used sessions (never `keep`) while over the count or memory budget."""
        self._report()
        with self._lock:
            while len(self._entries) > 1 and (len(self._entries) > self.max_sessions or self.nbytes > self.max_bytes):
                key, oldest = next(iter(self._entries.items()))
                if oldest is keep:
                    self._entries.move_to_end(key)
                    key, oldest = next(iter(self._entries.items()))
                    if oldest is keep:
                        break
                del self._entries[key]
                if oldest.generating is not None:
                    oldest.generating.cancel()

    def drop(self, key: str | None) -> None:
        with self._lock:
            entry = self._entries.pop(key or "", None)
        if entry is not None and entry.generating is not None:
            entry.generating.cancel()

    def stop(self, key: str | None) -> None:
        """Stop a running generation before its next token."""
        with self._lock:
            entry = self._entries.get(key or "")
        if entry is not None and entry.generating is not None:
            entry.generating.cancel()
            entry.generating = None

    def create(self, model_name: str, prompt_ids: list[int], config: SamplingConfig) -> tuple[str, Entry]:
        model = self.models.get(model_name)
        session = GenerationSession(model, self.models.tokenizer, prompt_ids, config, top_n=TOP_N, record=True)
        key = uuid.uuid4().hex
        entry = Entry(session, model_name, threading.Lock())
        with self._lock:
            self._entries[key] = entry
        self._evict(keep=entry)
        return key, entry

    def get(self, state: dict, config: SamplingConfig, who: Who = Who()) -> Entry:
        """The user's entry; rebuilt from `state` if it was dropped (its tokens replayed on the engine)."""
        key = state.get("key")
        with self._lock:
            entry = self._entries.get(key or "")
            if entry is not None:
                self._entries.move_to_end(key)
        if entry is None:
            if not state.get("ids"):
                raise UserError("Write a prompt and press Generate or Step first.")
            new_key, entry = self.create(state["model"], state["ids"][: state["prompt_len"]], config)
            replay = [int(t) for t in state["ids"][state["prompt_len"]:]]
            methods = state.get("methods")
            if not (isinstance(methods, str) and len(methods) == len(replay) and set(methods) <= set("sgf")):
                methods = "f" * len(replay)  # a state without a record of how its tokens came: say they were given
            if replay:  # two passes on the engine, however long the text: the tokens drawn here are drawn again
                s = entry.session
                self.engine.call(s, entry.lock, lambda: (s.replay(replay, methods), s.read()), who)
            with self._lock:
                self._entries[key or new_key] = self._entries.pop(new_key)
            state["key"] = key or new_key
        entry.session.config = config
        self._evict(keep=entry)
        return entry


# --- input checking -------------------------------------------------------------------------


def sampling_config(temperature, top_k, top_p, repetition_penalty, max_new_tokens, seed) -> SamplingConfig:
    """Build a config from UI values (which may arrive as floats or strings through the API)."""
    def as_int(name, value):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        return value

    try:
        return SamplingConfig(
            temperature=temperature, top_k=as_int("top_k", top_k), top_p=top_p,
            repetition_penalty=repetition_penalty, max_new_tokens=as_int("max_new_tokens", max_new_tokens),
            seed=as_int("seed", seed),
        )
    except ValueError as e:
        raise UserError(f"Setting out of range: {e}.") from e


def check_prompt(models: Models, model_name: str, prompt) -> list[int]:
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("The prompt is empty: type a few words for the model to continue.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UserError(f"The prompt is too long ({len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}).")
    ids = encode(models.tokenizer, prompt)
    n_ctx = models.get(model_name).cfg.n_positions
    if len(ids) >= n_ctx:
        raise UserError(
            f"The prompt is {len(ids)} tokens long, but {model_name} can only read {n_ctx} tokens at once "
            f"(and needs room to write). Shorten it to under {n_ctx} tokens."
        )
    return ids


def parse_forced_token(tokenizer, typed: str) -> tuple[int, str]:
    """A token the user typed: its exact text (e.g. ' Paris') or `#1234` for an id.

    Returns `(token id, hint)`; the hint (or "") says when the same word with a leading space
    is also one token, the usual meaning in the middle of a sentence.
    """
    if not isinstance(typed, str) or typed == "":
        raise UserError("Type a token to force, for example ' Paris' (with its leading space) or #464.")
    if len(typed) > 200:
        raise UserError("That is too long for one token: type a single token, for example ' Paris'.")
    if typed.startswith("#"):
        if not re.fullmatch(r"#[0-9]{1,7}", typed):
            raise UserError(f"{typed[:20]!r} is not a token id: write # and at most 7 digits, for example #464.")
        token = int(typed[1:])
        if token >= tokenizer.n_vocab:
            raise UserError(f"There is no token #{token}: ids go from 0 to {tokenizer.n_vocab - 1}.")
        return token, ""
    ids = encode(tokenizer, typed)
    if len(ids) != 1:
        pieces = " + ".join(repr(t) for t in token_strings(tokenizer, ids))
        raise UserError(
            f"{typed!r} is not a single token in GPT-2's vocabulary: it splits into {len(ids)} tokens ({pieces}). "
            f"Force them one at a time, or pick a candidate."
        )
    hint = ""
    if not typed[0].isspace() and len(encode(tokenizer, " " + typed)) == 1:
        hint = (f" Note: you forced {typed!r} without a leading space; in the middle of a sentence GPT-2 writes "
                f"{' ' + typed!r} (its own token).")
    return ids[0], hint


# --- examples -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """A prompt with a lesson: where to look (`tab`), and the head role to find by measuring it on the running model."""

    text: str
    hint: str
    tab: str = "chosen"
    role: str | None = None  # a head role from gpt2viz.roles: "Show me" opens the head that scores highest
    attend_to: str | None = None  # a token of the text: "Show me" opens the head where the last token reads it most
    english: bool = False  # needs a model that knows English (GPT-2 from the Hub)


INDUCTION_LENGTH = 12  # words in the random sequence; the example is this sequence twice


WORDS = ("apple river window garden silver rocket pencil castle forest island yellow marble tiger engine candle "
         "bridge cotton violin planet basket mirror ladder jacket rabbit orange hammer button thunder pepper lemon "
         "copper desert summer winter valley pocket anchor feather harbor shadow").split()  # each ' word' is one GPT-2 token


@functools.lru_cache(maxsize=4)
def induction_text(seed: int = 0) -> str:
    """Random single-token words in random order, then the same sequence again: token-exact, so the
    second copy repeats the first token for token, and nothing but the first copy predicts it."""
    tok = load_tokenizer()
    order = np.random.default_rng(seed).permutation(len(WORDS))[:INDUCTION_LENGTH]
    first = "".join(" " + WORDS[i] for i in order)
    ids = encode(tok, first)
    if len(ids) != INDUCTION_LENGTH or encode(tok, first * 2) != ids * 2:
        raise AssertionError("the induction example must repeat token for token")
    return first * 2


EXAMPLES: dict[str, Example] = {
    "Induction heads: a repeated random sequence": Example(
        "", "The text is a sequence of random words, then the same words again, token for token. In the second copy "
        "an *induction head* looks back at the token that came **after** the same token last time, and the model "
        "predicts the rest with confidence. **Show me** finds the head with the highest induction score on this model.",
        tab="attention", role="induction"),
    "Shakespeare: the previous-token head": Example(
        "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n",
        "A *previous-token head* sends almost all of each token's attention to the token just before it: a "
        "diagonal line one step left of the main diagonal. **Show me** finds the head that does this most.",
        tab="attention", role="previous_token"),
    "Factual recall": Example(
        "The Eiffel Tower is located in the city of",
        "The model must recall a fact. In the logit lens, find the layer at which ' Paris' becomes the top guess.",
        tab="lens", english=True),
    "Counting and patterns": Example(
        "1, 2, 3, 4, 5, 6, 7,",
        "A simple pattern: the next number is almost certain. Raise the temperature and watch the upcoming "
        "token's distribution flatten.", tab="chosen", english=True),
    "Grammar: agreement": Example(
        "The keys to the old wooden cabinet",
        "Is the next word ' are' or ' is'? The subject is 'keys', several tokens back: in the attention view, "
        "look at which earlier tokens the last token reads. **Show me** opens the head that reads ' keys' most.",
        tab="attention", attend_to=" keys", english=True),
}


DEFAULT_EXAMPLE, DEFAULT_EXAMPLE_BUNDLED = "Factual recall", "Shakespeare: the previous-token head"


def example_text(name: str) -> str:
    ex = EXAMPLES[name]
    return ex.text or induction_text()


def examples_for(model_name: str) -> list[str]:
    """The examples that can work on this model (the English ones need GPT-2 itself)."""
    english = model_name not in BUNDLED_MODELS
    return [name for name, ex in EXAMPLES.items() if english or not ex.english]


# --- the page's state and what a use case returns ---------------------------------------------

TABS = ("chosen", "attention", "overview", "lens", "embed", "experiment", "why")


def new_state(model_name: str) -> dict:
    """The per-user state: small, plain and JSON-friendly."""
    return {"key": None, "model": model_name, "prompt_len": 0, "ids": []}


def sync_state(state: dict, entry: Entry, key: str | None = None, ids: list[int] | None = None, methods: str | None = None) -> dict:
    """The state after a use case (other keys, such as what the page last drew, are kept); `ids` and `methods`: a
    snapshot of the text to take instead of the session's own (which the engine may be changing)."""
    s = entry.session
    return {**state, "key": key or state.get("key"), "model": entry.model_name, "prompt_len": len(s.prompt_ids),
            "ids": s.ids if ids is None else ids, "methods": methods_of(s) if methods is None else methods}


METHOD_LETTERS = {"sampled": "s", "greedy": "g", "forced": "f"}  # as share links write them


def methods_of(session: GenerationSession) -> str:
    """How each generated token came, a letter each (METHOD_LETTERS)."""
    return "".join(METHOD_LETTERS[st.method] for st in session.steps)


@dataclass
class Selection:
    """What the views show: one position (None: the newest token), one layer and head, one tab."""

    position: int | None = None
    layer: int = 0
    head: int = 0
    tab: str = "chosen"
    per_head_scale: bool = False
    compact: bool = False  # a narrow screen: fewer tokens per figure
    lens_mode: str = "top"  # the lens shows each layer's top guess, the final token's rank, or the entropy
    strip_colour: str = "prob"  # one of STRIP_COLOURS

    @classmethod
    def of(cls, position, layer, head, tab, per_head_scale=False, compact=False, lens_mode="top",
           strip_colour="prob") -> "Selection":
        return cls(as_index(position), as_index(layer) or 0, as_index(head) or 0,
                   tab if tab in TABS else "chosen", bool(per_head_scale), bool(compact),
                   lens_mode if lens_mode in LENS_MODES else "top",
                   strip_colour if strip_colour in STRIP_COLOURS else "prob")


@dataclass
class Page:
    """What the page shows after a use case. None means "leave as it is" (the state too)."""

    state: dict | None
    status: str | None = None
    strip: dict | None = None
    strip_key: str | None = None  # the strip's colour key (HTML)
    prompt: str | None = None
    hint: str | None = None
    examples: list[str] | None = None
    selection: Selection | None = None  # clamped to the text and the model
    n_tokens: int = 0
    n_generated: int = 0
    n_layer: int = 1
    n_head: int = 1
    selected_label: str | None = None
    upcoming: object | None = None
    choices: list[tuple[str, int]] | None = None
    views: dict[str, object] = field(default_factory=dict)
    open_tab: str | None = None  # switch the page to this tab
    targets: list[str] | None = None  # what the Experiment view can switch off (after a model switch)
    targets_value: list[str] | None = None  # what it switches off (the induction lesson sets it)
    settings: dict | None = None  # the sampling controls' values (a shared link sets them)
    modes: bool = False  # send the selection's view modes to their controls (a shared link sets them)
    versus: str | None = None  # the Why tab's comparison token as typed (a shared link sets it)
    file: tuple[str, bytes] | None = None  # a download: (file name, contents)
    warning: bool = False
    echo: bool = True  # send the selection back to the sliders (False: the user just set them to these values)

    def build(self) -> "Page":
        """Draw the figures the engine's part of a render left as recipes (`recipe`), on the waiter's thread
        (in the web process when the engine has a process of its own: `worker.py`)."""
        if DEFER_BUILD:
            return self
        if isinstance(self.upcoming, functools.partial):
            self.upcoming = self.upcoming()
        self.views = {k: v() if isinstance(v, functools.partial) else v for k, v in self.views.items()}
        return self


DEFER_BUILD = False  # True in the engine's own process (worker.py): the web process draws the figures


def as_index(value) -> int | None:
    """A non-negative integer from a UI or API value, or None (ASCII digits only, at most 7 of them)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return int(value) if value >= 0 else None
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value >= 0 and value.is_integer() and value < 1e7 else None
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,7}", value.strip()):
        return int(value.strip())
    return None


def sent_before_link(state, link_shown: bool) -> bool:
    """Whether a view event was sent by a page that had not yet shown the shared link its state now holds.

    The browser selects the open tab when the page mounts, at the same moment as the page's load asks for the
    link; the server reads the state when it runs an event, not when the browser sent it, so that select can run
    after the link's text is in the state and would draw it at the controls' first values (token 0, layer 0, the
    first tab) over the link's own view. `link_shown`: the page has shown the link's answer (app.py sets a hidden
    box with it); such an event is dropped whole."""
    return bool((state or {}).get("from_link")) and not link_shown


def clamp(selection: Selection, n_tokens: int, n_layer: int, n_head: int) -> Selection:
    """The one clamping rule: the position into the text (None: the newest), layer and head into the model."""
    last = max(n_tokens - 1, 0)
    position = last if selection.position is None else min(selection.position, last)
    return dataclasses.replace(selection, position=position, layer=min(selection.layer, n_layer - 1),
                               head=min(selection.head, n_head - 1))


# --- the controller: every use case of the page ------------------------------------------------


class Controller:
    """The page's use cases over `Models` and `Sessions`, with plain values in and `Page`s out.

    Each method that changes the text returns every view for the new state in one `Page`
    (the strip, the selected token's views, the upcoming token and the picker, the slider ranges).
    Errors a user can fix come back as a `Page` with a warning; anything else is logged and
    reported as a short message. No method lets an exception reach Gradio.
    """

    def __init__(self, models: Models, sessions: Sessions) -> None:
        self.models, self.sessions, self.engine = models, sessions, sessions.engine

    # -- sessions and the engine --

    def _entry(self, state: dict, model_name: str, prompt, config: SamplingConfig, who: Who) -> tuple[dict, Entry]:
        """The user's session: continued, or started anew if the prompt or the model changed."""
        ids = check_prompt(self.models, model_name, prompt)
        state = dict(state or new_state(model_name))
        if state.get("ids") and state.get("model") == model_name and state["ids"][: state["prompt_len"]] == ids:
            return state, self.sessions.get(state, config, who)
        self.sessions.drop(state.get("key"))
        key, entry = self.sessions.create(model_name, ids, config)
        return sync_state(state, entry, key), entry

    def _stream_gap(self) -> float:
        """Seconds between two messages of a streamed text: none while a few texts stream; with a class
        generating, about one message per 0.6 s (30 texts) carrying the tokens made meanwhile: each message
        costs the web server Python time under the interpreter lock that the engine waits for (30 students:
        ~5% more tokens in all, bench/README.md)."""
        n = self.engine.generating()
        return 0.0 if n <= STREAM_ALONE else min(1.0, STREAM_GAP * n)

    def _call(self, entry: Entry, who: Who, fn):
        """Run `fn()` on the engine's loop (the one budget for everything that runs the model)."""
        return self.engine.call(entry.session, entry.lock, fn, who)

    def _generate_one(self, entry: Entry, who: Who, force: int | None = None) -> Step:
        """One token, batched with every other user's: the engine reads the text and chooses (or takes `force`)."""
        steps = [d.step for d in self.engine.generate(entry.session, entry.lock, 1, who, force=[force])]
        if not steps:
            raise ContextLengthError("The text fills the model's context: rewind or reset to continue.")
        return steps[0]

    def _refuse(self, state: dict, error: Exception) -> Page:
        if isinstance(error, (UserError, ContextLengthError, ValueError, Overloaded, TargetError)):
            return Page(state, status=warn(str(error)), warning=True)
        log.error("request failed: %s: %s", type(error).__name__, error)
        return Page(state, status=warn(f"Something went wrong ({type(error).__name__}); please try again."), warning=True)

    def _act(self, state, model_name, prompt, settings, selection: Selection, action, follow_newest=True,
             who: Who | None = None) -> Page:
        """Open or continue the session, run `action(entry) -> message` (which puts any model work on the
        engine), and render every view for the new state."""
        who = who or Who()
        try:
            config = sampling_config(*settings)
            state, entry = self._entry(state, model_name, prompt, config, who)
            if entry.generating:
                return Page(state, status=warn("Busy generating: press Stop first."), warning=True)
            message = action(entry) or ""
            if follow_newest:
                selection.position = None
            return self._call(entry, who, lambda: self._render(sync_state(state, entry), entry, selection, message)).build()
        except Exception as e:  # noqa: BLE001 - every failure becomes a message in the page
            return self._refuse(state, e)

    # -- use cases --

    def open(self, state, model_name, prompt, settings, selection: Selection, who: Who | None = None) -> Page:
        """Read the prompt (no token added) and show it: after choosing an example or a model."""
        return self._act(state, model_name, prompt, settings, selection, lambda e: "", follow_newest=False, who=who)

    def step(self, state, model_name, prompt, settings, selection: Selection, who: Who | None = None) -> Page:
        def action(entry):
            step = self._generate_one(entry, who or Who())
            return step_summary(step) + (f" Stopped: {step.message}." if step.message else "")
        return self._act(state, model_name, prompt, settings, selection, action, who=who)

    def reset(self, state, model_name, prompt, settings, selection: Selection, who: Who | None = None) -> Page:
        def action(entry):
            self._call(entry, who or Who(), lambda: entry.session.rewind(0))
            return "Back to the prompt."
        return self._act(state, model_name, prompt, settings, selection, action, who=who)

    def rewind(self, state, model_name, prompt, settings, selection: Selection, keep, who: Who | None = None) -> Page:
        def action(entry):
            total = len(entry.session.steps)
            n = as_index(keep)
            if n is None or n > total:
                raise UserError(f"Can rewind to between 0 and {total} generated tokens, not {keep!r}.")
            self._call(entry, who or Who(), lambda: entry.session.rewind(n))
            return f"Rewound to {n} generated token{'s' if n != 1 else ''}."
        return self._act(state, model_name, prompt, settings, selection, action, who=who)

    def force(self, state, model_name, prompt, settings, selection: Selection, token, who: Who | None = None) -> Page:
        """Add the picked candidate (a token id) as the next token."""
        def action(entry):
            token_id = as_index(token)
            if token_id is None:
                raise UserError("Pick one of the candidates first.")
            if token_id >= entry.session.model.cfg.vocab_size:
                raise UserError(f"There is no token #{token_id}: ids go from 0 to {entry.session.model.cfg.vocab_size - 1}.")
            return step_summary(self._generate_one(entry, who or Who(), token_id))
        return self._act(state, model_name, prompt, settings, selection, action, who=who)

    def force_text(self, state, model_name, prompt, settings, selection: Selection, typed, who: Who | None = None) -> Page:
        """Add a typed token (its exact text, or #id) as the next token, with a hint when a space is likely missing."""
        def action(entry):
            token_id, hint = parse_forced_token(self.models.tokenizer, typed)
            return step_summary(self._generate_one(entry, who or Who(), token_id)) + hint
        return self._act(state, model_name, prompt, settings, selection, action, who=who)

    def stream(self, state, model_name, prompt, settings, selection: Selection, tokens_per_second=0,
               who: Who | None = None) -> Iterator[Page]:
        """Generate up to max_new_tokens, yielding a small `Page` (state, strip, status) per token, the last
        one with the closing message; the views follow from `select(..., upcoming=True)`. The engine
        generates (batched with everyone else's tokens, paced at `tokens_per_second`, 0: as fast as the
        model goes) and stops before the next token on Stop or when this waiter goes away."""
        who = who or Who()
        try:
            config = sampling_config(*settings)
            state, entry = self._entry(state, model_name, prompt, config, who)
            if entry.generating:
                yield Page(state, status=warn("Already generating: press Stop first."), warning=True)
                return
            if entry.session.room_left <= 0:
                yield Page(state, status=warn("The text fills the model's context: rewind or reset to continue."), warning=True)
                return
            rate = float(tokens_per_second) if isinstance(tokens_per_second, (int, float)) and tokens_per_second > 0 else 0.0
            if hardware.on_gpu_per_call(entry.model_name):
                yield from self._stream_on_gpu(state, entry, config, who)
                return
            run = entry.generating = self.engine.generate(entry.session, entry.lock, config.max_new_tokens, who,
                                                          rate=min(rate, 1000.0))
        except Exception as e:  # noqa: BLE001
            yield self._refuse(state, e)
            return
        s, total, message, n, got, ended = entry.session, config.max_new_tokens, "Stopped.", 0, None, False
        methods = methods_of(s)  # then one letter per token delivered: a state streamed is a state a rebuild can use
        decided = None
        if selection.strip_colour == "decided":  # the text before this run keeps its colours; new tokens wait for the end
            text, marks = entry.marks
            decided = marks if list(text) == s.ids[: len(text)] else {}
        try:
            for batch in run.batches(self._stream_gap):  # several tokens in one message when this waiter fell behind
                n, got = n + len(batch), batch[-1]
                methods += "".join(METHOD_LETTERS[d.step.method] for d in batch)
                step = got.step
                message = step_summary(step)
                if step.finish_reason is not None and step.finish_reason != "max_new_tokens":
                    message += f" Stopped: {step.message}."
                if entry.generating is not run:
                    message = "Stopped."
                    break
                if n < total and step.finish_reason is None:  # the last token comes with the full page below
                    yield Page({**state, "prompt_len": len(s.prompt_ids), "ids": got.ids, "methods": methods},
                               status=f"Generating… {n} of {total} tokens.",
                               strip=strip_of(self.models.tokenizer, got.ids, got.logprobs, None, decided))
            if entry.generating is not run:
                message = "Stopped."
            else:
                ended = got is not None
        except Exception as e:  # noqa: BLE001
            log.error("generation failed: %s: %s", type(e).__name__, e)
            message = warn(f"Generation stopped ({type(e).__name__}).") if not isinstance(e, Overloaded) else warn(str(e))
        finally:
            run.cancel()
            if entry.generating is run:
                entry.generating = None
        # The last page carries the text and the message only: the page then asks for every view (`select`
        # with the upcoming token), in a second event whose outputs are all the components. At the run's end it
        # is the engine's snapshot of the text: the engine is still reading the last token (the views wait for
        # that), so the session itself is not to be read here.
        if ended and not any(math.isnan(x) for x in got.logprobs[1:]):
            yield Page(sync_state(state, entry, ids=got.ids, methods=methods), status=message,
                       strip=strip_of(self.models.tokenizer, got.ids, got.logprobs, None, decided))
        else:
            with entry.lock:  # after a Stop or a failure the engine may be in the middle of a pass over this text
                page = Page(sync_state(state, entry), status=message, strip=token_strip(s, None, decided))
            yield page

    def _stream_on_gpu(self, state, entry: Entry, config: SamplingConfig, who: Who) -> Iterator[Page]:
        """`stream` for a model whose generations run on a GPU lent per call (ZeroGPU, `hardware.py`): one call
        generates the whole text, token by token (shown as they come); then the CPU's copy reads the tokens in
        one pass (`GenerationSession.replay`), so that every view is read from the text as usual."""
        s = entry.session
        settings = {k: getattr(config, k) for k in SHARE_SETTINGS}
        n = min(config.max_new_tokens, s.room_left)
        got: list[int] = []
        entry.generating = run = _GpuRun()
        try:
            for token in hardware.generate_on_gpu(entry.model_name, list(s.ids), settings, n, {}):
                if run.cancelled:
                    break
                got.append(token)
                ids = s.ids + got
                yield Page({**state, "prompt_len": len(s.prompt_ids), "ids": ids},
                           status=f"Generating on the GPU… {len(got)} of {n} tokens.",
                           strip=strip_of(self.models.tokenizer, ids, list(s.records.logprobs), None))
        except Exception as e:  # noqa: BLE001 - the quota, the queue or the GPU: say so, keep what came
            log.error("GPU generation failed: %s: %s", type(e).__name__, e)
            message = warn(f"The GPU could not finish this text ({type(e).__name__}: {str(e)[:200]}).")
        else:
            message = None
        finally:
            entry.generating = None
        differ = self._call(entry, who, lambda: s.replay(got)) if got else 0
        if message is None:
            message = step_summary(s.steps[-1]) if got else "Nothing was generated."
            if differ:
                message += f" {differ} token(s) drawn on the GPU came out differently here and were kept as drawn there."
        yield Page(sync_state(state, entry), status=message, strip=token_strip(s, None))

    def stop(self, state) -> None:
        self.sessions.stop((state or {}).get("key"))

    def select(self, state, settings, selection: Selection, from_sliders: bool = False, who: Who | None = None,
               upcoming: bool = False) -> Page:
        """Show another token, layer, head or tab: the views only (`upcoming`: the upcoming token's too, after a
        generation). `from_sliders`: the selection came from the sliders themselves, which are then left alone
        unless clamping changed it."""
        who = who or Who()
        try:
            if not (state or {}).get("ids"):
                # Nothing to draw, and nothing to send back: the browser fires the open tab's select when the page
                # mounts, before there is a text (see also `sent_before_link`).
                return Page(None)
            entry = self.sessions.get(state, sampling_config(*settings), who)
            page = self._call(entry, who, lambda: self._render(sync_state(state, entry), entry, selection, None, upcoming)).build()
            # A slider being dragged or stepped with the keyboard must not be pulled back to the value of
            # an earlier event: echo the selection only when clamping changed it.
            chosen = page.selection
            page.echo = not from_sliders or (selection.position, selection.layer, selection.head) != (chosen.position, chosen.layer, chosen.head)
            return page
        except Exception as e:  # noqa: BLE001
            return self._refuse(state, e)

    def upcoming(self, state, settings, who: Who | None = None) -> Page:
        """After a sampling control moved: the upcoming token's distribution and the picker, no token added."""
        who = who or Who()
        try:
            config = sampling_config(*settings)
            if not (state or {}).get("ids"):
                return Page(state)
            entry = self.sessions.get(state, config, who)

            def draw():
                fig, choices = upcoming_view(entry.session, draw=False)
                return Page(sync_state(state, entry), upcoming=fig, choices=choices)
            return self._call(entry, who, draw).build()
        except Exception as e:  # noqa: BLE001
            return self._refuse(state, e)

    def switch_model(self, state, model_name, prompt, settings, selection: Selection, who: Who | None = None) -> Page:
        """Load another model and show the same prompt through it; every range and view follows."""
        try:
            self.models.get(model_name)
        except Exception as e:  # noqa: BLE001
            log.error("could not load %s: %s: %s", model_name, type(e).__name__, e)
            return Page(state, status=warn(f"Could not load {model_name} ({type(e).__name__})."), warning=True)
        log.info("switch to %s", model_name)
        self.sessions.drop((state or {}).get("key"))
        fresh = new_state(model_name)
        cfg = self.models.get(model_name).cfg
        selection = dataclasses.replace(selection, position=None, layer=0, head=0)
        names = examples_for(model_name)
        if not isinstance(prompt, str) or not prompt.strip():
            return Page(fresh, status=f"Switched to **{model_name}**. Type a prompt and press Step or Generate.",
                        strip=empty_strip(), selection=selection, n_layer=cfg.n_layer, n_head=cfg.n_head,
                        upcoming=plots.empty_figure("Type a prompt: its next token appears here."), choices=[],
                        views=empty_views(), examples=names, targets=target_choices(cfg), targets_value=[])
        page = self.open(fresh, model_name, prompt, settings, selection, who=who)
        page.examples = names
        page.targets, page.targets_value = target_choices(cfg), []
        if not page.warning:
            page.status = f"Switched to **{model_name}** ({cfg.n_layer} layers × {cfg.n_head} heads)."
        return page

    def choose_example(self, state, model_name, name, settings, selection: Selection, show_me=False,
                       who: Who | None = None) -> Page:
        """Put an example in the prompt and read it; with `show_me`, open the tab, layer and head where
        its lesson is, found by measuring this model, or say that this model does not show it."""
        who = who or Who()
        if name not in EXAMPLES:
            return Page(state, status=warn("Choose an example first."), warning=True)
        ex, text = EXAMPLES[name], example_text(name)
        hint = ex.hint
        message = ""
        selection.position = None  # a new text: its newest token
        if show_me:
            selection.tab = ex.tab
            if ex.role:
                try:
                    model = self.models.get(model_name)
                    scores = self.engine.call(None, None, lambda: head_scores(model), who)
                except Exception as e:  # noqa: BLE001
                    return self._refuse(state, e)
                layer, head, score = scores.best(ex.role)
                role = ex.role.replace("_", "-")
                if score < ROLE_THRESHOLD:
                    message = warn(
                        f"{model_name} has no clear {role} head: the best one, layer {layer} head {head}, scores "
                        f"{score:.2f} (a head needs {ROLE_THRESHOLD:.2f}; the score is its mean attention on repeated random "
                        f"tokens). This model cannot show this lesson; try " + _models_with_role_hint(ex.role) + ".")
                    selection.tab = "chosen"
                else:
                    selection.layer, selection.head = layer, head
                    message = f"Layer {layer}, head {head} is this model's strongest {role} head (score {score:.2f})."

        def measure(s: GenerationSession) -> str:
            """Find, in this model and this text, the head that reads `attend_to` most from the last token."""
            s.read()
            target = encode(self.models.tokenizer, ex.attend_to)
            where = [i for i, t in enumerate(s.ids) if t == target[0]] if len(target) == 1 else []
            if not where:
                return warn(f"{ex.attend_to!r} is not a token of this text.")
            last = len(s.ids) - 1
            weights = np.stack([s.attention_pattern(layer, last, last + 1)[:, 0, where[0]]
                                for layer in range(s.model.cfg.n_layer)])  # [layer, head]
            layer, head = np.unravel_index(int(np.argmax(weights)), weights.shape)
            weight = float(weights[layer, head])
            if weight < ROLE_THRESHOLD:
                selection.tab = "chosen"
                return warn(f"No head of {model_name} sends the last token's attention to {ex.attend_to!r}: the most is "
                            f"{weight:.0%} (layer {layer}, head {head}; a head needs {ROLE_THRESHOLD:.0%}).")
            selection.layer, selection.head = int(layer), int(head)
            return f"Layer {layer}, head {head} sends {weight:.0%} of the last token's attention to {ex.attend_to!r}."

        def action(entry: Entry) -> str:
            return self._call(entry, who, lambda: measure(entry.session)) if show_me and ex.attend_to else ""

        page = self._act(state, model_name, text, settings, selection, action, follow_newest=False, who=who)
        if page.warning and page.strip is None:
            return page
        message = message or page.status or ""
        page.prompt, page.hint = text, hint
        page.status = message or page.status
        page.warning = page.warning or message.startswith("⚠️")
        page.open_tab = selection.tab if show_me else None
        return page

    def experiment(self, state, model_name, prompt, settings, selection: Selection, targets, mode, neurons="",
                   patch_text="", who: Who | None = None) -> Page:
        """Generate from the prompt twice with the current settings, as the model is and with `targets` switched
        off (`mode` "zero" or "mean"; also MLP `neurons` "layer: n, n", and the residual stream entering the
        selected layer patched from `patch_text`), coupled (the same random draw at every step, `compare.py`),
        as many tokens as the text has generated (or the max new tokens), taking the same forced tokens; open
        the Experiment view."""
        who = who or Who()
        try:
            config = sampling_config(*settings)
            cfg = self.models.get(model_name).cfg
            interventions = parse_targets(targets, mode, cfg, neurons, patch_text, min(selection.layer, cfg.n_layer - 1))
            state, entry = self._entry(state, model_name, prompt, config, who)
            if entry.generating:
                return Page(state, status=warn("Busy generating: press Stop first."), warning=True)
            labels = [targets] if isinstance(targets, str) else list(targets)
            return self._experiment(state, entry, config, selection, interventions, labels, mode, who)
        except Exception as e:  # noqa: BLE001
            return self._refuse(state, e)

    def _experiment(self, state, entry: Entry, config: SamplingConfig, selection: Selection, interventions, labels, mode,
                    who: Who) -> Page:
        """The coupled runs of `experiment`, kept with the session, and the page opened on them."""
        s = entry.session
        n = min(len(s.steps) or config.max_new_tokens, s.model.cfg.n_positions - len(s.prompt_ids))
        if n <= 0:
            raise UserError("The prompt fills the model's context: shorten it to leave room for generation.")
        force = [st.token_id if st.method == "forced" else None for st in s.steps[:n]]
        runs = [GenerationSession(s.model, s.tokenizer, s.prompt_ids, config, top_n=TOP_N, record=True, interventions=ivs)
                for ivs in ((), interventions)]
        # both runs in the engine's batch, with every other user's tokens
        generations = [self.engine.generate(run, threading.Lock(), n, who, force=force) for run in runs]
        for g in generations:
            for _ in g:
                pass
        report = self.engine.call(None, None, lambda: coupled_report(*runs), who)
        entry.experiment = Experiment(labels, mode, interventions, report, runs[0].steps, runs[1].steps)
        selection.tab = "experiment"
        page = self._call(entry, who, lambda: self._render(sync_state(state, entry), entry, selection, summary(entry.experiment))).build()
        page.open_tab = "experiment"
        return page

    def _shared(self, state, entry: Entry, settings, selection: Selection) -> Shared:
        """The page's state as a link holds it (`share.Shared`)."""
        s, exp = entry.session, entry.experiment
        methods = methods_of(s)
        cfg = sampling_config(*settings)
        versus = state.get("versus")
        return Shared(entry.model_name, self.models.tokenizer.decode(s.prompt_ids), {k: getattr(cfg, k) for k in SHARE_SETTINGS},
                      [st.token_id for st in s.steps], methods, list(exp.interventions) if exp else [],
                      selection.position, selection.layer, selection.head, selection.tab, selection.lens_mode,
                      selection.strip_colour, versus if isinstance(versus, int) else None)

    def share_link(self, state, prompt, settings, selection: Selection) -> str:
        """The link that replays this page (`share.py`): "" when there is no text yet."""
        if not (state or {}).get("ids"):
            return ""
        try:
            entry = self.sessions.get(state, sampling_config(*settings))
            return encode_link(self._shared(state, entry, settings, selection))
        except Exception:  # noqa: BLE001 - nothing to share
            return ""

    def download(self, state, settings, selection: Selection, what, paper="a4", base: str = "", who: Who | None = None) -> Page:
        """One of DOWNLOADS for this page, as `Page.file` (name, bytes): the handout (PDF or PNG, A4 or Letter;
        its link starts with `base`, the page's address), the upcoming token's table or the lens window as CSV,
        the whole run as .npz, or the Python script."""
        who = who or Who()
        try:
            if what not in DOWNLOADS:
                raise UserError(f"There is no download {str(what)[:40]!r}: choose one of the list.")
            if paper not in ("a4", "letter"):
                raise UserError("Choose A4 or Letter paper.")
            config = sampling_config(*settings)
            if not (state or {}).get("ids"):
                raise UserError("Nothing to download yet: press Step or Generate first.")
            entry = self.sessions.get(state, config, who)
            if entry.generating:
                raise UserError("Busy generating: press Stop first, or wait for the text to finish.")
            s = entry.session
            cfg = s.model.cfg
            sel = clamp(selection, len(s.ids), cfg.n_layer, cfg.n_head)
            name = re.sub(r"[^A-Za-z0-9._-]+", "-", entry.model_name)[:40]
            if what == "reproduce.py":
                data = export.script(self._shared(state, entry, settings, sel), state.get("versus")).encode("utf-8")
            elif what in ("handout.pdf", "handout.png"):
                link = encode_link(self._shared(state, entry, settings, sel))
                link = f"{base}/?s={link}" if base else link
                n = len(s.ids)
                handout = self._call(entry, who, lambda: export.handout_data(
                    s, entry.model_name, sel.position, sel.layer, sel.head, link, window(sel.position, n, HANDOUT["attention"]),
                    window(sel.position, n, HANDOUT["lens"]), lens_layers(cfg.n_layer, HANDOUT["lens_layers"])))
                data = render_handout(handout, paper, what.rsplit(".", 1)[1])  # on the waiter's thread, not the engine's
            else:
                def table() -> bytes:
                    s.read()
                    if what == "upcoming.csv":
                        if s.room_left <= 0:
                            raise UserError("The text fills the model's context: there is no upcoming token.")
                        return export.upcoming_csv(s).encode("utf-8")
                    if what == "lens.csv":
                        return export.lens_csv(s, *window(sel.position, len(s.ids), COMPACT["lens"] if sel.compact else WINDOW_LENS)).encode("utf-8")
                    return export.run_npz(s, entry.model_name)
                data = self._call(entry, who, table)
            page = Page(sync_state(state, entry), status=f"Ready: {DOWNLOADS[what]}. Click the file below to save it.")
            page.file = (f"gpt2viz-{name}-{what}", data)
            return page
        except Exception as e:  # noqa: BLE001
            return self._refuse(state, e)

    def open_link(self, state, link, who: Who | None = None) -> Page:
        """The page a link describes: its model, prompt and settings, its tokens replayed (a sampled token is drawn
        again and checked against the link's), its experiment run again, its selection; or what is wrong with it."""
        who = who or Who()
        try:
            shared = decode_link(link)
        except ShareLinkError as e:
            return Page(new_state(self.models.default), status=warn(str(e)), warning=True, strip=empty_strip())
        if shared.model not in self.models.names():
            return Page(new_state(self.models.default), warning=True, strip=empty_strip(), status=warn(
                f"This link was made with the model {shared.model!r}, which this server does not have. Available: "
                f"{', '.join(self.models.names())}. Choose one and press Step to start."))
        settings = [shared.settings[k] for k in SHARE_SETTINGS]
        config = sampling_config(*settings)
        sel = Selection.of(shared.position, shared.layer, shared.head, shared.tab, lens_mode=shared.lens_mode,
                           strip_colour=shared.strip_colour)
        try:
            state, entry = self._entry(new_state(shared.model), shared.model, shared.prompt, config, who)
            state["versus"], state["from_link"] = shared.versus, True
            s = entry.session
            if len(s.prompt_ids) + len(shared.tokens) > s.model.cfg.n_positions:
                raise UserError("This link's text is longer than the model's context.")
            if any(t >= s.model.cfg.vocab_size for t in shared.tokens):
                raise UserError("This link's tokens are not in this model's vocabulary.")

            def replay() -> int:
                differ = 0
                for token, how in zip(shared.tokens, shared.methods):
                    if how == "f":
                        s.step(force=token)
                        continue
                    if s.step().token_id != token:  # another CPU rounded a draw the other way: keep the link's branch
                        differ += 1
                        s.rewind(len(s.steps) - 1)
                        s.step(force=token)
                s.read()
                return differ
            differ = self._call(entry, who, replay)
            state = sync_state(state, entry)
            if shared.interventions:
                mode = next((iv.mode for iv in shared.interventions if hasattr(iv, "mode")), "zero")
                page = self._experiment(state, entry, config, sel, shared.interventions,
                                        [describe(iv) for iv in shared.interventions], mode, who)
            else:
                page = self._call(entry, who, lambda: self._render(state, entry, sel, None)).build()
            page.open_tab = sel.tab
            note = f" {differ} sampled token(s) came out differently on this server and were taken from the link." if differ else ""
            page.status = f"Opened a shared page: {shared.model}, {len(shared.tokens)} generated tokens.{note}" + (
                f" {page.status}" if page.status else "")
            page.prompt, page.settings, page.modes = shared.prompt, shared.settings, True
            if shared.versus is not None:
                page.versus = token_strings(self.models.tokenizer, [shared.versus])[0]
            return page
        except Exception as e:  # noqa: BLE001
            return self._refuse(state, e)

    def compare_with(self, state, settings, selection: Selection, typed, who: Who | None = None) -> Page:
        """The Why tab's comparison token: typed (as for forcing: ' are' or #464), or empty for the runner-up."""
        state = dict(state or {})
        hint = ""
        if typed is None or (isinstance(typed, str) and not typed.strip()):
            state["versus"] = None
        else:
            try:
                state["versus"], hint = parse_forced_token(self.models.tokenizer, typed)
            except Exception as e:  # noqa: BLE001
                return self._refuse(state, e)
        selection.tab = "why"
        page = self.select(state, settings, selection, who=who)
        if page.state is None:  # no text yet: the word typed is kept for when there is one
            page.state = state
        if state["versus"] is not None and not page.warning:
            page.status = f"Comparing with {typed!r}." + hint.replace("you forced", "you chose")
        return page

    def induction_lesson(self, state, model_name, settings, selection: Selection, who: Who | None = None) -> Page:
        """The induction example, with the heads this model's detector calls induction heads switched off."""
        who = who or Who()
        try:
            model = self.models.get(model_name)
            scores = self.engine.call(None, None, lambda: head_scores(model), who)
        except Exception as e:  # noqa: BLE001
            return self._refuse(state, e)
        layers, heads = np.nonzero(scores.induction >= ROLE_THRESHOLD)
        if not len(layers):
            return self._previous_token_lesson(state, model_name, settings, selection, scores, who)
        labels = [head_label(int(layer), int(head)) for layer, head in zip(layers, heads)]
        text = induction_text()
        page = self.experiment(state, model_name, text, settings, selection, labels, "zero", who=who)
        page.prompt, page.targets_value = text, labels
        entry_exp = self.sessions.get(page.state, sampling_config(*settings), who).experiment if not page.warning else None
        if entry_exp is not None:
            r, half = entry_exp.report, INDUCTION_LENGTH
            first = [-r.logprob_original[1:half].mean(), -r.logprob_intervened[1:half].mean()]
            second = [-r.logprob_original[half + 1:2 * half].mean(), -r.logprob_intervened[half + 1:2 * half].mean()]
            page.status = (f"**Lesson: induction heads.** The prompt is {half} random words, then the same words again. "
                           f"Switched off: {', '.join(labels)} (the heads whose induction score is at least {ROLE_THRESHOLD:.2f}). "
                           f"Loss on the second copy, which only copying can predict: {second[0]:.2f} → **{second[1]:.2f}** nats "
                           f"per token; on the first copy, which nothing can predict: {first[0]:.2f} → {first[1]:.2f}. "
                           + ("The runs first differ at generated token "
                              f"{r.first_divergence + 1}." if r.first_divergence is not None else "The generated texts are the same."))
        return page

    def _previous_token_lesson(self, state, model_name, settings, selection: Selection, scores, who: Who) -> Page:
        """The lesson for a model without induction heads: its strongest previous-token head switched off, on the
        Shakespeare example (head 0.0 on the bundled model)."""
        ind_layer, ind_head, ind_score = scores.best("induction")
        layer, head, score = scores.best("previous_token")
        if score < ROLE_THRESHOLD:
            return Page(state, status=warn(
                f"{model_name} has neither an induction head nor a previous-token head to switch off (best scores "
                f"{ind_score:.2f} and {score:.2f}; a head needs {ROLE_THRESHOLD:.2f})."), warning=True)
        text = example_text("Shakespeare: the previous-token head")
        label = head_label(layer, head)
        page = self.experiment(state, model_name, text, settings, selection, [label], "zero", who=who)
        if page.warning:
            return page
        page.prompt, page.targets_value = text, [label]
        exp = self.sessions.get(page.state, sampling_config(*settings), who).experiment
        r = exp.report
        page.status = (f"**Lesson: the previous-token head.** {model_name} has no induction head (the best, head "
                       f"{ind_layer}.{ind_head}, scores {ind_score:.2f}; a head needs {ROLE_THRESHOLD:.2f}), so this lesson "
                       f"switches off its previous-token head instead: {label}, which sends each token's attention to the one "
                       f"before it (score {score:.2f}). Loss on the prompt: {r.prompt_loss_original:.2f} → "
                       f"**{r.prompt_loss_intervened:.2f}** nats per token. "
                       + (f"The runs first differ at generated token {r.first_divergence + 1}." if r.first_divergence is not None
                          else "The generated texts are the same."))
        return page

    # -- rendering --

    def _render(self, state, entry: Entry, selection: Selection, message: str | None, upcoming: bool = True) -> Page:
        """Every view of the page for `selection` (clamped), the visible tab's figures only (runs on the engine)."""
        s = entry.session
        s.read()
        cfg = s.model.cfg
        n = len(s.ids)
        sel = clamp(selection, n, cfg.n_layer, cfg.n_head)
        decided = None
        if sel.strip_colour == "decided":
            decided = strip_marks(s, sel.position)
            entry.marks = (tuple(s.ids), decided)
        page = Page(state, status=message, strip=token_strip(s, sel.position, decided),
                    strip_key=strip_key(sel.strip_colour, s.model.cfg.n_layer), selection=sel, n_tokens=n,
                    n_generated=len(s.steps), n_layer=cfg.n_layer, n_head=cfg.n_head,
                    selected_label=selected_label(s, sel.position))
        if upcoming:
            page.upcoming, page.choices = upcoming_view(s, draw=False)
        page.views = tab_views(s, sel, self.models, entry.experiment, versus=state.get("versus"))
        return page


class _GpuRun:
    """A generation running in a GPU call: Stop marks it, and the page stops taking its tokens."""

    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def _models_with_role_hint(role: str) -> str:
    return "toy-induction (trained to have one) or gpt2" if role == "induction" else "tiny-shakespeare or gpt2"


def warn(message: str) -> str:
    message = message.strip()
    message = message[:1].upper() + message[1:]
    return message if message.startswith("⚠️") else f"⚠️ {message}"


# --- views ----------------------------------------------------------------------------------

PROB_BINS = [(0.5, "likely"), (0.1, "plausible"), (0.01, "unlikely"), (0.0, "surprising")]
STRIP_KEY = [("likely", "likely (> 50%)"), ("plausible", "plausible (10–50%)"), ("unlikely", "unlikely (1–10%)"),
             ("surprising", "surprising (< 1%)"), ("first", "the first token (nothing before it)")]


def prob_category(logprob: float) -> str:
    p = float(np.exp(logprob)) if np.isfinite(logprob) else 0.0
    return next(label for threshold, label in PROB_BINS if p >= threshold)


DECIDED_WINDOW = 256  # tokens of the strip coloured by where the model decided (each new one reads the lens once)


def token_strip(session: GenerationSession, selected: int | None, decided: dict | None = None) -> dict:
    """The session's text as tokens for the strip (`strip_of`), coloured by probability or by `decided`."""
    return strip_of(session.tokenizer, session.ids, session.records.logprobs, selected, decided)


def strip_marks(session: GenerationSession, selected: int | None) -> dict[int, tuple[str, str]]:
    """Where the model decided each of the DECIDED_WINDOW tokens around the selected one (`decision_marks`)."""
    n = len(session.ids)
    s, e = window(n - 1 if selected is None else selected, n, DECIDED_WINDOW)
    s = max(s, 1)
    return dict(zip(range(s, e), decision_marks(session, s, e))) if e > s else {}


def strip_of(tokenizer, ids: list[int], logprobs: list[float], selected: int | None,
             decided: dict[int, tuple[str, str]] | None = None) -> dict:
    """The text as tokens for the strip: `{"tokens": [{t, c, p, br, sel}], "selected": int}`.

    `t` the token as shown everywhere (`plots.show`), `c` its category by the probability the model gave
    it from the tokens before it (`logprobs[i]`; prompt tokens too; the first has none; NaN: not scored yet,
    in a stream's first message, `generation.read_together`), `p` that
    probability as text, `br` a line break after a newline token, `sel` "sel" on the selected token.
    With `decided` (position -> (class, text), `decision_marks`), the strip is coloured by where the model
    decided instead; positions it lacks are left uncoloured ("undecided").
    """
    strings = token_strings(tokenizer, ids)
    out = []
    for i, text in enumerate(strings):
        known = 0 < i < len(logprobs) and not np.isnan(logprobs[i])
        c = prob_category(logprobs[i]) if known else "first"
        p = f"token {i}: " + (f"the model gave it {plots.pct(float(np.exp(logprobs[i])))}" if known
                              else "the first token" if i == 0 else "not scored yet (a moment)")
        if decided is not None:
            c, p = decided.get(i, ("first", f"token {i}: " + ("the first token" if i == 0 else "not coloured (new, or far from the selected token)")))
        out.append({"t": plots.show(text), "c": c, "p": p, "br": "\n" in text, "sel": "sel" if i == selected else ""})
    return {"tokens": out, "selected": -1 if selected is None else selected}


def strip_key(colour: str, n_layer: int) -> str:
    """The strip's colour key (HTML) for `colour` (STRIP_COLOURS)."""
    if colour == "decided":
        chips = [(f"dec-{c}", w) for c, w in DECISION_BINS] + [("first", "not coloured (the first token, or far from the selected one)")]
        what = (f"Colour: where the model decided each token — the first of its {n_layer} layers from which the logit lens's top "
                "guess for it stopped changing (the model's final top guess, which a sampled token need not be).")
    else:
        chips, what = STRIP_KEY, "Colour: how likely the model found each token, given the text before it."
    return what + " " + "".join(f'<span class="key"><i class="chip {c}"></i>{html.escape(w)}</span>' for c, w in chips)


def empty_strip() -> dict:
    return {"tokens": [], "selected": -1}


def selected_label(session: GenerationSession, position: int) -> str:
    token = plots.show(token_strings(session.tokenizer, [session.ids[position]])[0])
    where = "your prompt" if position < len(session.prompt_ids) else "generated"
    return f"**Selected: token {position} `{token}`** ({where}) — click a token, or use the slider or the arrow keys."


def window(selected: int, n: int, size: int) -> tuple[int, int]:
    """A window of at most `size` positions in [0, n) that contains `selected`, ending at it when possible."""
    end = min(n, max(selected + 1 + size // 4, size))
    start = max(0, end - size)
    return start, min(n, start + size)


def crop_note(start: int, end: int, n: int) -> str:
    return f"tokens {start}–{end - 1} of {n}" if (start, end) != (0, n) else f"all {n} tokens"


WINDOW_ATTENTION = 16  # tokens in one head's heatmap and in the all-heads grid (each one labelled)
WINDOW_LENS = 12
HANDOUT = dict(attention=16, lens=8, lens_layers=13)  # what fits a printed page
DOWNLOADS = {"handout.pdf": "the handout (PDF)", "handout.png": "the handout (PNG)",
             "upcoming.csv": "the upcoming token's table (CSV)", "lens.csv": "the logit lens window (CSV)",
             "run.npz": "the whole run as numpy arrays (.npz, with a README inside)",
             "reproduce.py": "a Python script that recreates this page and prints the selected view's numbers"}
COMPACT = dict(attention=10, lens=7, lens_layers=5)  # a phone's screen


def step_summary(step: Step) -> str:
    how = {"sampled": "sampled", "greedy": "chosen greedily", "forced": "chosen by you"}[step.method]
    return (f"Token {step.position + 1} `{plots.show(step.token_text)}` was {how}: the model gave it "
            f"{plots.pct(step.prob)} (rank {step.rank}); after your settings {plots.pct(step.prob_final)}.")


def chosen_view(session: GenerationSession, position: int, draw: bool = True):
    """How the token at `position` came to be: for a generated token the distribution it was drawn from
    (raw and final, the chosen one marked); for a prompt token what the model predicted there.
    `draw=False` returns the figure as a recipe to draw later (`Page.build`), away from the engine's loop."""
    token = plots.show(token_strings(session.tokenizer, [session.ids[position]])[0])
    if position == 0:
        return recipe(draw, plots.empty_figure, f"Token 0 ({token}) is the first token: nothing came before it, so the model predicted nothing.")
    n_prompt = len(session.prompt_ids)
    if position >= n_prompt:
        step = session.steps[position - n_prompt]
        cands = step.candidates
        chosen = next(i for i, c in enumerate(cands) if c.token_id == step.token_id)
        how = {"sampled": "drawn at random from the blue bars", "greedy": "the likeliest (temperature 0)",
               "forced": "chosen by you"}[step.method]
        return recipe(draw, plots.next_token_figure,
            [c.text for c in cands], np.array([c.prob for c in cands]), np.array([c.prob_final for c in cands]), chosen,
            f"How token {position} ({token}) was chosen",
            f"after reading token {position - 1} · grey: the model · blue: after your settings then · ▶ {how}")
    probs = session.model_distribution(position - 1)
    actual = session.ids[position]
    top = torch.topk(probs, TOP_N).indices.tolist()
    rank = int((probs > probs[actual]).sum()) + 1
    if actual not in top:
        top.append(actual)
    texts = token_strings(session.tokenizer, top)
    p = probs[top].numpy()
    return recipe(draw, plots.next_token_figure,
        texts, p, None, top.index(actual), f"What the model predicted for token {position} ({token})",
        f"a prompt token (you wrote it, nothing was sampled) · grey: the model's probabilities · ▶ the actual token: rank {rank}")


def upcoming_view(session: GenerationSession, draw: bool = True):
    """The next token's distribution under the current settings, and the picker's choices: `(figure, [(label, id)])`
    (`draw=False`: the figure as a recipe, see `chosen_view`)."""
    if session.room_left <= 0:
        return recipe(draw, plots.empty_figure, "The text fills the model's context: rewind or reset to continue."), []
    pred = session.peek()
    cands = pred.candidates
    cfg = session.config
    settings = "temperature 0: greedy" if cfg.greedy else f"temperature {cfg.temperature:g}, top-k {cfg.top_k or 'off'}, top-p {cfg.top_p:g}"
    if cfg.repetition_penalty != 1:
        settings += f", penalty {cfg.repetition_penalty:g}"
    fig = recipe(draw, plots.next_token_figure, [c.text for c in cands], np.array([c.prob for c in cands]),
                                  np.array([c.prob_final for c in cands]), None,
                                  f"Upcoming: token {pred.position + 1}",
                                  f"grey: the model · blue: after your settings · {settings}")
    choices = [(f"{plots.show(c.text)}  —  {plots.pct(c.prob_final)} (model: {plots.pct(c.prob)})", c.token_id) for c in cands]
    return fig, choices


def recipe(draw: bool, figure, *args):
    """`figure(*args)` now, or (draw=False) later: what the engine's loop leaves for the waiter to draw."""
    return figure(*args) if draw else functools.partial(figure, *args)


def tab_views(session: GenerationSession, sel: Selection, models=None, experiment: Experiment | None = None,
              versus: int | None = None) -> dict[str, object]:
    """The figures of the visible tab only (the others are drawn when opened); the chosen tab's as a recipe.
    `versus`: the token the Why tab compares the selected one with (None: the runner-up)."""
    if sel.tab == "why":
        return why_views(session, sel.position, sel.layer, sel.head, versus, session.config)
    if sel.tab == "experiment":
        return experiment_views(experiment, sel.position, session.tokenizer)
    if sel.tab == "chosen":
        return {"chosen": chosen_view(session, sel.position, draw=False)}
    if sel.tab == "attention":
        one, _, row = attention_views(session, sel.position, sel.layer, sel.head, compact=sel.compact, grid=False)
        return {"attention": one, "row": row}
    if sel.tab == "overview":
        _, grid, _ = attention_views(session, sel.position, sel.layer, sel.head, sel.per_head_scale, sel.compact, head_view=False)
        return {"grid": grid, "overview": overview_view(session, sel)}
    if sel.tab == "lens":
        return {"lens": logit_lens_view(session, sel.position, sel.compact, sel.lens_mode),
                "lens_strip": decision_strip(session, sel.position)}
    emb, norm, traj = embedding_views(session, sel.position)
    return {"embed": emb, "norm": norm, "traj": traj}


EXPERIMENT_EMPTY = ("No experiment yet. Choose what to switch off (select a head in the Attention or Heads view "
                    "and press “Add the selected head”, or pick from the list), then press “Run experiment”.")


def experiment_views(experiment: Experiment | None, position: int, tokenizer) -> dict[str, object]:
    """The Experiment view for the selected position (figures as recipes)."""
    if experiment is None:
        return {"exp_strips": f'<div class="exp-empty">{EXPERIMENT_EMPTY}</div>',
                "exp_loss": plots.empty_figure("Run an experiment: both models' surprise at each token appears here."),
                "exp_bars": plots.empty_figure("Run an experiment, then select a token.")}
    bars = bars_view(experiment, position, tokenizer)
    n = len(experiment.report.original_ids)
    return {"exp_strips": strips_html(experiment, tokenizer), "exp_loss": recipe(False, *surprisal_view(experiment)),
            "exp_bars": recipe(False, *bars) if bars else plots.empty_figure(
                f"Select a token from 1 to {n - 1} of the original text: how both models predicted it appears here.")}


def empty_views() -> dict[str, object]:
    blank = plots.empty_figure("Press Step or Generate, or choose an example.")
    return ({name: blank for name in ("chosen", "attention", "row", "grid", "lens", "embed", "norm", "traj")} | {"overview": "", "lens_strip": ""}
            | experiment_views(None, 0, None) | {"why_dla": "", "why_neurons": "", "why_sampler": ""})


def head_badges(model: GPT2) -> dict[tuple[int, int], str]:
    """`{(layer, head): "prev" | "dup" | "ind"}` for heads whose role score passes the threshold."""
    scores = head_scores(model)
    out = {}
    for role, short_name in (("previous_token", "prev"), ("duplicate_token", "dup"), ("induction", "ind")):
        for layer, head in zip(*np.nonzero(getattr(scores, role) >= ROLE_THRESHOLD)):
            out[(int(layer), int(head))] = out.get((int(layer), int(head)), "") + ("+" if (int(layer), int(head)) in out else "") + short_name
    return out


def attention_views(session: GenerationSession, position: int, layer: int, head: int,
                    per_head_scale: bool = False, compact: bool = False, grid: bool = True, head_view: bool = True):
    """(one head's heatmap, all heads of the layer over the same window, the selected token's attention row);
    `grid=False` skips the second, `head_view=False` the first and third (None in their place)."""
    cfg = session.model.cfg
    n = len(session.records)
    layer = int(np.clip(layer, 0, cfg.n_layer - 1))
    head = int(np.clip(head, 0, cfg.n_head - 1))
    strings = token_strings(session.tokenizer, session.ids[:n])
    size = COMPACT["attention"] if compact else WINDOW_ATTENTION
    s, e = window(position, n, size)
    square = session.attention_pattern(layer, s, e)[:, :, s:e]  # [head, query, key] in the window
    token = plots.show(strings[position])
    one = row_fig = heads = None
    if head_view:
        one = plots.attention_heatmap(square[head], strings[s:e], s, f"Layer {layer}, head {head}",
                                      f"{crop_note(s, e, n)} · orange: token {position} ({token}) · darker: more attention",
                                      selected=position, compact=compact)
        row = session.attention_pattern(layer, position, position + 1)[:, 0]  # [head, key 0..position]
        rs = max(0, position + 1 - size)
        row_fig = plots.attention_row_figure(row[:, rs:], strings[rs: position + 1], rs,
                                             f"What token {position} ({token}) reads in layer {layer}",
                                             crop_note(rs, position + 1, position + 1) + " before it · each row sums to 1 over all of them")
    if grid:
        badges = head_badges(session.model)
        heads = plots.heads_grid(square, strings[s:e], s, f"All {cfg.n_head} heads of layer {layer}",
                                 f"{crop_note(s, e, n)} · orange: token {position}" + (" · each head on its own scale" if per_head_scale else ""),
                                 selected=position, per_head_scale=per_head_scale,
                                 roles=[badges.get((layer, h), "") for h in range(cfg.n_head)], compact=compact)
    return one, heads, row_fig


def overview_view(session: GenerationSession, sel: Selection) -> str:
    """Every head of every layer as a thumbnail of its attention over the window (HTML, clickable)."""
    cfg = session.model.cfg
    n = len(session.records)
    s, e = window(sel.position, n, COMPACT["attention"] if sel.compact else WINDOW_ATTENTION)
    patterns = np.stack([session.attention_pattern(layer, s, e)[:, :, s:e] for layer in range(cfg.n_layer)])
    return plots.heads_overview_html(patterns, head_badges(session.model), (sel.layer, sel.head),
                                     f"Every head of every layer, {crop_note(s, e, n)}")


def lens_layers(n_layer: int, most: int) -> list[int]:
    """Which residual-stream rows the lens shows: all of them if they fit, else evenly spaced, the first and last always."""
    rows = n_layer + 1
    if rows <= most:
        return list(range(rows))
    return sorted(set(np.linspace(0, rows - 1, most).round().astype(int).tolist()))


def logit_lens_view(session: GenerationSession, position: int, compact: bool = False, mode: str = "top"):
    n = len(session.records)
    cfg = session.model.cfg
    s, e = window(position, n, COMPACT["lens"] if compact else WINDOW_LENS)
    if mode != "top":
        return lens_values_view(session, s, e, compact, mode)
    ids, probs = session.logit_lens(s, e)  # [layer + 1, W, 1]
    rows = lens_layers(cfg.n_layer, COMPACT["lens_layers"] if compact else 13)
    names = ["emb" if r == 0 else f"{r - 1}" for r in rows]
    top = [token_strings(session.tokenizer, ids[rows, w, 0].tolist()) for w in range(e - s)]
    strings = token_strings(session.tokenizer, session.ids[s: e])
    nxt = token_strings(session.tokenizer, session.ids[s + 1: e + 1])
    nxt += [""] * (e - s - len(nxt))
    some = "" if len(rows) == cfg.n_layer + 1 else f" · {len(rows)} of {cfg.n_layer + 1} layers"
    return plots.logit_lens_figure(top, probs[rows, :, 0].T, names, strings, s, nxt,
                                   "Logit lens: each layer's guess",
                                   f"{crop_note(s, e, n)}{some} · colour: the guess's probability · "
                                   f"✓ the guess is the token that came next" + (" · emb: embeddings · next: the token that came next" if compact else ""),
                                   compact=compact)


def lens_values_view(session: GenerationSession, s: int, e: int, compact: bool, mode: str):
    """The lens window as numbers: at each layer, the rank of the model's final top guess, or the entropy of the guess."""
    cfg = session.model.cfg
    c = commitment(session, s, e)
    rows = lens_layers(cfg.n_layer, COMPACT["lens_layers"] if compact else 13)
    names = ["emb" if r == 0 else f"{r - 1}" for r in rows]
    strings = token_strings(session.tokenizer, session.ids[s:e])
    final = token_strings(session.tokenizer, c.final.tolist())
    n = len(session.records)
    if mode == "rank":
        values = c.rank[rows].T.astype(np.float32)
        return plots.lens_values_figure(
            np.log10(values), [[f"{int(v)}" if v < 1000 else f"{v / 1000:.0f}k" for v in row] for row in values], names, strings, s, final,
            "Logit lens: rank of the final guess", f"{crop_note(s, e, n)} · each cell: the rank, at that layer, of the token "
            f"the model finally puts first (1 = already the top guess) · colour: log of the rank", "log10 rank", "YlGnBu_r", compact)
    values = c.entropy[rows].T.astype(np.float32)
    return plots.lens_values_figure(
        values, [[f"{v:.1f}" for v in row] for row in values], names, strings, s, final,
        "Logit lens: how unsure each layer is", f"{crop_note(s, e, n)} · each cell: the entropy of that layer's guess, "
        f"in nats (0 = certain, {math.log(cfg.vocab_size):.1f} = no idea)", "entropy (nats)", "YlOrRd", compact)


DECISION_WINDOW = 32  # tokens in the Lens tab's decision strip (each new position reads 13+ rows through the unembedding once)
DECISION_BINS = (("early", "decided early (the embeddings or the first third of the layers)"), ("middle", "in the middle third"),
                 ("late", "in the last third"), ("last", "only at the last layer"))


def decision_marks(session: GenerationSession, start: int, end: int) -> list[tuple[str, str]]:
    """For tokens start..end-1 (start >= 1): (class, text) of where the model decided each: the third of the
    layers from which the logit lens's top guess for it stopped changing (`attribution.commitment_layers`)."""
    layers = commitment_layers(session, start - 1, end - 1)  # the guess for token p is made reading p - 1
    L = session.model.cfg.n_layer
    out = []
    for p, layer in zip(range(start, end), layers):
        third = "last" if layer >= L else "early" if layer <= L / 3 else "middle" if layer <= 2 * L / 3 else "late"
        where = "the embeddings" if layer == 0 else f"block {layer - 1}"
        out.append((f"dec-{third}", f"token {p}: the model's top guess for it was settled from {where} on"))
    return out


def decision_strip(session: GenerationSession, position: int) -> str:
    """The text up to the selected token, each token coloured by where the model decided it (`decision_marks`)."""
    n = len(session.records)
    end = min(position + 1, n)
    start = max(1, end - DECISION_WINDOW)
    if end <= start:
        return ""
    strings = token_strings(session.tokenizer, session.ids[start:end])
    spans = [f'<span class="tok {c}" title="{html.escape(title)}">{html.escape(plots.show(text))}</span>'
             for text, (c, title) in zip(strings, decision_marks(session, start, end))]
    key = "".join(f'<span class="key"><i class="chip dec-{c}"></i>{html.escape(w)}</span>' for c, w in DECISION_BINS)
    return (f'<div class="ov-title">Where the model decided, tokens {start}–{end - 1}</div><div class="strip">{"".join(spans)}</div>'
            f'<div class="ov-note">Colour: the layer from which the logit lens\'s top guess for the token no longer changed '
            f'(the model\'s final top guess, which a sampled token need not be). {key}</div>')


def embedding_views(session: GenerationSession, position: int):
    rec = session.records
    token = plots.show(token_strings(session.tokenizer, [session.ids[position]])[0])
    emb = plots.embedding_figure(rec.embed[position], rec.pos_embed[position],
                                 f"Token {position} ({token}) enters the model",
                                 "blue: its token embedding · orange: its position embedding · their sum is the input")
    resid = rec.resid[position]  # [layer + 1, C]
    norms = plots.resid_norm_figure(np.linalg.norm(resid, axis=-1), f"Token {position}'s residual stream grows",
                                    "its length after the embeddings and after each block")
    ids, _ = session.logit_lens(position, position + 1)  # [layer + 1, 1, 1]
    guesses = token_strings(session.tokenizer, ids[:, 0, 0].tolist())
    traj = plots.trajectory_figure(resid, guesses, f"Token {position}'s path through the layers",
                                   "its residual stream after each block, projected on 2 axes (PCA) · "
                                   "hover a point: the logit lens's guess for the next token there")
    return emb, norms, traj


def add_head(labels, models: Models, model_name: str, layer, head) -> list[str]:
    """The Experiment view's list with the head selected in the views added (clamped into the model)."""
    labels = [x for x in (labels or []) if isinstance(x, str)]
    try:
        cfg = models.get(model_name).cfg
    except Exception:  # noqa: BLE001 - an unknown model: the list stays as it is
        return labels
    label = head_label(min(as_index(layer) or 0, cfg.n_layer - 1), min(as_index(head) or 0, cfg.n_head - 1))
    return labels if label in labels else labels + [label]
