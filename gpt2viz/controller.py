"""What the web app does, without the web: models, per-user sessions, and the views they show.

`app.py` only lays out Gradio components and wires them to these functions. Everything
here takes and returns plain values (dicts, lists, strings, plotly figures), so it is
tested directly. All state lives in two places: the small per-user `state` dict (which
Gradio keeps per browser session) and the `Sessions` store below, which holds each user's
heavy generation session (KV cache, captures) and can always be rebuilt from `state`.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from . import plots
from .generation import GenerationSession, Step
from .loading import BUNDLED_MODELS, HUB_MODELS, CheckpointError, HubUnavailableError, hub_reachable, load_model, resolve_checkpoint
from .model import GPT2, ContextLengthError
from .sampling import SamplingConfig
from .tokenizer import encode, load_tokenizer, token_strings

OFFLINE_MODEL = "tiny-shakespeare"
MAX_PROMPT_CHARS = 20_000
WINDOW_ATTENTION = 40  # positions shown in one head's heatmap
WINDOW_GRID = 24  # positions per head in the all-heads grid
WINDOW_LENS = 16  # positions in the logit lens grid
TOP_N = 10

EXAMPLES = {
    "Induction heads: a repeated random sequence": (
        "ember quartz violet lantern oxide marble pepper tundra ember quartz violet lantern oxide marble",
        "The second time the sequence appears, some heads look back at the token that came *after* the same word "
        "last time, and the model predicts the rest of the sequence with confidence. Look at the attention view "
        "of a late layer for a diagonal stripe offset by one.",
    ),
    "Factual recall": (
        "The Eiffel Tower is located in the city of",
        "The model must recall a fact. In the logit lens, watch the layer at which ' Paris' becomes the top guess.",
    ),
    "Shakespeare": (
        "ROMEO:\nBut soft, what light through yonder window breaks?\nJULIET:\n",
        "The bundled model was trained on Shakespeare: this is its home ground. Attention often points at the "
        "previous token and at the speaker's name.",
    ),
    "Counting and patterns": (
        "1, 2, 3, 4, 5, 6, 7,",
        "A simple pattern: the next number is almost certain. Compare the raw and final probabilities as you "
        "raise the temperature.",
    ),
    "Grammar: agreement": (
        "The keys to the old wooden cabinet",
        "Is the next word ' are' or ' is'? The subject is 'keys', several tokens back: attention must reach it.",
    ),
}


class UserError(ValueError):
    """Bad input from a user: the message is shown in the page as it is."""


# --- models ---------------------------------------------------------------------------------


class Models:
    """Models loaded once per process and shared read-only by every user."""

    def __init__(self, default: str | None = None, max_loaded: int = 2) -> None:
        self._models: OrderedDict[str, GPT2] = OrderedDict()
        self._lock = threading.Lock()
        self.max_loaded = max_loaded
        self.tokenizer = load_tokenizer()
        self.online = hub_reachable()
        self.notice = ""
        self.extra: dict[str, str] = {}  # display name -> path given on the command line
        self.default = self._choose_default(default)

    def _choose_default(self, requested: str | None) -> str:
        wanted = requested or "gpt2"
        if wanted not in HUB_MODELS and wanted not in BUNDLED_MODELS:
            name = f"local: {wanted}"
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
            if name in ("gpt2-large", "gpt2-xl"):
                continue  # too slow to be live on a 2-core CPU
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
        model = load_model(self.extra.get(name, name), local_files_only=not self.online)
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
    lock: threading.Lock
    generating: object | None = None  # the running generation's token; cleared by Stop


class Sessions:
    """Each user's live generation session, keyed by a random id kept in their state.

    Bounded (least recently used ones are dropped first); a dropped one is rebuilt from the
    user's state (token ids) the next time it is needed.
    """

    def __init__(self, models: Models, max_sessions: int = 16, max_bytes: int | None = None) -> None:
        self.models = models
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes if max_bytes is not None else int(os.environ.get("GPT2VIZ_SESSIONS_MAX_BYTES", 4 << 30))
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.session.nbytes for e in list(self._entries.values()))

    def _evict(self, keep: Entry) -> None:
        """Drop least recently used sessions (never `keep`) while over the count or memory budget."""
        with self._lock:
            while len(self._entries) > 1 and (len(self._entries) > self.max_sessions or self.nbytes > self.max_bytes):
                key, oldest = next(iter(self._entries.items()))
                if oldest is keep:
                    self._entries.move_to_end(key)
                    key, oldest = next(iter(self._entries.items()))
                    if oldest is keep:
                        break
                del self._entries[key]

    def drop(self, key: str | None) -> None:
        with self._lock:
            self._entries.pop(key or "", None)

    def stop(self, key: str | None) -> None:
        """Ask a running generation to stop before its next token."""
        with self._lock:
            entry = self._entries.get(key or "")
        if entry is not None:
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

    def get(self, state: dict, config: SamplingConfig) -> Entry:
        """The user's entry; rebuilt from `state` if it was dropped."""
        key = state.get("key")
        with self._lock:
            entry = self._entries.get(key or "")
            if entry is not None:
                self._entries.move_to_end(key)
        if entry is None:
            if not state.get("ids"):
                raise UserError("Write a prompt and press Generate or Step first.")
            new_key, entry = self.create(state["model"], state["ids"][: state["prompt_len"]], config)
            with entry.lock:
                for token in state["ids"][state["prompt_len"]:]:
                    entry.session.step(force=token)
            with self._lock:
                self._entries[key or new_key] = self._entries.pop(new_key)
            state["key"] = key or new_key
        entry.session.config = config
        self._evict(keep=entry)
        return entry


def new_state(model_name: str) -> dict:
    """The per-user state: small, plain and JSON-friendly."""
    return {"key": None, "model": model_name, "prompt_len": 0, "ids": []}


def sync_state(state: dict, entry: Entry, key: str | None = None) -> dict:
    s = entry.session
    return {"key": key or state.get("key"), "model": entry.model_name, "prompt_len": len(s.prompt_ids), "ids": s.ids}


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


def parse_forced_token(tokenizer, typed: str) -> int:
    """A token the user typed: its exact text (e.g. ' Paris') or `#1234` for an id."""
    if not isinstance(typed, str) or typed == "":
        raise UserError("Type a token to force, for example ' Paris' (with its leading space) or #464.")
    if typed.startswith("#") and typed[1:].isdigit():
        token = int(typed[1:])
        if token >= tokenizer.n_vocab:
            raise UserError(f"There is no token #{token}: ids go from 0 to {tokenizer.n_vocab - 1}.")
        return token
    ids = encode(tokenizer, typed)
    if len(ids) != 1:
        pieces = " + ".join(repr(t) for t in token_strings(tokenizer, ids))
        raise UserError(
            f"{typed!r} is not a single token in GPT-2's vocabulary: it splits into {len(ids)} tokens ({pieces}). "
            f"Force them one at a time, or pick a candidate."
        )
    return ids[0]


# --- views ----------------------------------------------------------------------------------

PROB_BINS = [(0.5, "likely (>50%)"), (0.1, "plausible (10-50%)"), (0.01, "unlikely (1-10%)"), (0.0, "surprising (<1%)")]
STRIP_COLORS = {
    "start": "#d9dde3",
    "likely (>50%)": "#2e9e5b",
    "plausible (10-50%)": "#9ccc65",
    "unlikely (1-10%)": "#f6b44b",
    "surprising (<1%)": "#e4572e",
}


def prob_category(logprob: float) -> str:
    p = float(np.exp(logprob)) if np.isfinite(logprob) else 0.0
    return next(label for threshold, label in PROB_BINS if p >= threshold)


def token_strip(session: GenerationSession) -> list[tuple[str, str]]:
    """The text as `(token text, category)` pairs, every token (prompt included) by the probability
    the model gave it given the tokens before it; the first token has none ("start")."""
    # Newlines shown as a visible mark so that every token stays one box.
    strings = [t.replace("\n", "↵").replace("\t", "⇥") for t in token_strings(session.tokenizer, session.ids)]
    logprobs = session.records.logprobs
    out = []
    for i, text in enumerate(strings):
        if i == 0 or i >= len(logprobs) or np.isnan(logprobs[i]):
            out.append((text, "start"))
        else:
            out.append((text, prob_category(logprobs[i])))
    return out


def window(selected: int, n: int, size: int) -> tuple[int, int]:
    """A window of at most `size` positions in [0, n) that contains `selected`, ending at it when possible."""
    end = min(n, max(selected + 1 + size // 4, size))
    start = max(0, end - size)
    return start, min(n, start + size)


def crop_note(start: int, end: int, n: int) -> str:
    return "" if (start, end) == (0, n) else f"<br><sup>showing tokens {start}–{end - 1} of {n}</sup>"


def step_summary(step: Step | None, tokenizer) -> str:
    if step is None:
        return ""
    how = {"sampled": "sampled", "greedy": "chosen greedily", "forced": "chosen by you"}[step.method]
    return (f"Last token **{plots.show(step.token_text)!s}** was {how}: the model gave it "
            f"{step.prob:.1%} (rank {step.rank}); after your settings {step.prob_final:.1%}.")


def next_token_view(step: Step | None):
    """Bar chart of the latest step's candidates with the chosen one marked."""
    if step is None:
        return plots.empty_figure("Press Step or Generate to see how the next token is chosen.")
    cands = step.candidates
    chosen = next(i for i, c in enumerate(cands) if c.token_id == step.token_id)
    return plots.next_token_figure(
        [c.text for c in cands], np.array([c.prob for c in cands]), np.array([c.prob_final for c in cands]), chosen,
        f"How token {step.position + 1} ({plots.show(step.token_text)}) was chosen",
    )


def candidate_choices(session: GenerationSession) -> list[tuple[str, int]]:
    """The upcoming token's candidates as (label, token id) for a picker."""
    pred = session.peek()
    return [(f"{plots.show(c.text)}  —  {c.prob_final:.1%} (model: {c.prob:.1%})", c.token_id) for c in pred.candidates]


def attention_views(session: GenerationSession, position: int, layer: int, head: int):
    """(one head's heatmap, all heads of the layer, the selected token's attention row)."""
    cfg = session.model.cfg
    n = len(session.records)
    layer = int(np.clip(layer, 0, cfg.n_layer - 1))
    head = int(np.clip(head, 0, cfg.n_head - 1))
    strings = token_strings(session.tokenizer, session.ids[:n])

    def square(start, end, heads):
        return session.attention_pattern(layer, start, end)[heads][:, :, start:end]  # [head, query, key] in the window

    s, e = window(position, n, WINDOW_ATTENTION)
    one = plots.attention_heatmap(square(s, e, [head])[0], strings[s:e], s,
                                  f"Layer {layer}, head {head}{crop_note(s, e, n)}", selected=position)
    gs, ge = window(position, n, WINDOW_GRID)
    grid = plots.heads_grid(square(gs, ge, list(range(cfg.n_head))), strings[gs:ge], gs,
                            f"All {cfg.n_head} heads of layer {layer}{crop_note(gs, ge, n)}")
    row = session.attention_pattern(layer, position, position + 1)[:, 0]  # [head, key 0..position]
    rs = max(0, position + 1 - WINDOW_ATTENTION)
    row_fig = plots.attention_row_figure(row[:, rs:], strings[rs: position + 1], rs,
                                         f"What token {position} ({plots.show(strings[position])}) attends to in layer {layer}"
                                         f"{crop_note(rs, position + 1, position + 1)}")
    return one, grid, row_fig


def logit_lens_view(session: GenerationSession, position: int):
    rec = session.records
    n = len(rec)
    s, e = window(position, n, WINDOW_LENS)
    ids, probs = session.logit_lens(s, e)  # [layer + 1, W, 1]
    top = [token_strings(session.tokenizer, row.tolist()) for row in ids[..., 0]]
    strings = token_strings(session.tokenizer, session.ids[s: e + 1])
    return plots.logit_lens_figure(top, probs[..., 0], strings[: e - s], s,
                                   f"Logit lens: each layer's top guess for the next token{crop_note(s, e, n)}",
                                   next_tokens=strings[1:] + [""] * (e - s + 1 - len(strings)))


def embedding_views(session: GenerationSession, position: int):
    rec = session.records
    token = plots.show(token_strings(session.tokenizer, [session.ids[position]])[0])
    emb = plots.embedding_figure(rec.embed[position], rec.pos_embed[position],
                                 f"Token {position} ({token}): token embedding and position embedding")
    resid = rec.resid[position]  # [layer + 1, C]
    norms = plots.resid_norm_figure(np.linalg.norm(resid, axis=-1), f"Length of token {position}'s residual stream, layer by layer")
    ids, _ = session.logit_lens(position, position + 1)  # [layer + 1, 1, 1]
    nearest = token_strings(session.tokenizer, ids[:, 0, 0].tolist())
    traj = plots.trajectory_figure(resid, nearest, f"Token {position}'s path through the layers (PCA), labelled with the nearest token")
    return emb, norms, traj
