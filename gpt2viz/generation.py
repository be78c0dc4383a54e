"""Token-by-token generation with per-step captures, forcing and rewinding.

    session = GenerationSession(model, tokenizer, "The capital of France is", SamplingConfig(seed=1))
    step = session.step()            # one token, one forward pass (the first one reads the prompt)
    step = session.step(force=318)   # choose the next token yourself
    session.rewind(1)                # keep only the first generated token, then branch
    for step in session.run(): ...   # stream up to max_new_tokens more

`generate(model, tokenizer, prompt, config)` is the same as a plain streaming run.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import tiktoken
import torch

from .interventions import Intervention, InterventionError, Plan, resolve
from .model import GPT2, SLABS, ContextLengthError
from .capture import next_token_logprobs
from .recording import Pending, PerStep, Recorder, Records, known_rows
from .sampling import DistributionRows, SamplingConfig, distribution_rows, draw_rows, ranks, row_entropies, uniform
from .tokenizer import ENDOFTEXT_ID, encode, token_strings


@dataclass
class Candidate:
    """One possible next token and what each stage of the sampling pipeline made of it."""

    token_id: int
    text: str
    logit: float  # raw model output
    prob: float  # softmax of the raw logits
    prob_temperature: float  # after temperature only
    prob_final: float  # after repetition penalty, temperature, top-k and top-p: what was sampled from


@dataclass
class Step:
    """One generated token and everything captured while choosing it.

    The forward pass of this step read the token at `position` (the last one of the text so
    far) and produced the distribution from which `token_id` was chosen for `position + 1`.
    Captures are for `position`: its attention over positions 0..position, its residual
    stream, and the logit lens of each layer.
    """

    index: int  # 0-based count of generated tokens before this one
    position: int
    token_id: int
    token_text: str
    text: str  # prompt + generated text so far, complete characters only
    method: str  # "sampled", "greedy" or "forced"
    prob: float  # raw probability of the chosen token
    rank: int  # its rank under the raw distribution (1 = most likely)
    prob_final: float
    rank_final: int
    entropy: float  # nats, raw distribution
    entropy_final: float
    candidates: list[Candidate]
    # In a recording session (`record=True`) attention and the lens are None: the session
    # recomputes them exactly on demand (`attention_row`, `logit_lens`).
    attention: np.ndarray | None  # [layer, head, key] float16, key = 0..position
    resid: np.ndarray  # [layer + 1, d_model] float16: after the embeddings, after each block
    lens_ids: np.ndarray | None  # [layer + 1, top_n] int32: logit lens top tokens read from each resid row
    lens_probs: np.ndarray | None  # [layer + 1, top_n] float16
    finish_reason: str | None = None  # "eos", "max_new_tokens" or "context" when generation ends here
    message: str = ""
    config: SamplingConfig | None = None  # the settings it was chosen with


def step_nbytes(step: Step) -> int:
    """About the memory one `Step` holds: its arrays and text, plus ~0.5 KB for itself and for each candidate
    (objects, floats, strings; measured with tracemalloc). For gpt2 about 26 KB, mostly the float16 residual row."""
    arrays = sum(a.nbytes for a in (step.attention, step.resid, step.lens_ids, step.lens_probs) if a is not None)
    return arrays + len(step.text) + 512 * (1 + len(step.candidates))


@dataclass
class Prediction:
    """The next-token distribution for the text as it stands, before anything is chosen."""

    position: int  # the position read; the candidates are for position + 1
    candidates: list[Candidate]
    entropy: float
    entropy_final: float


@dataclass
class _State:
    ids: list[int]
    steps: list[Step] = field(default_factory=list)


@dataclass(eq=False)
class PromptReading:
    """A prompt as the engine's pass read it: the final-layer-normed row of its last position (`[d_model]`), and
    the logits unembedded from it, once a session adopting the reading asks for them (`adopt_prompt`): one
    unembedding for every session that adopts it (a class on one example), not one each (~8 ms for gpt2)."""

    normed: torch.Tensor
    _logits: torch.Tensor | None = None

    def logits(self, model: GPT2) -> torch.Tensor:
        """`[vocab]` float32 on the CPU: `model.unembed_rows` of the row (shared: copy before changing it)."""
        if self._logits is None:
            self._logits = model.unembed_rows(self.normed[None]).float().cpu()[0]
        return self._logits


class GenerationSession:
    """Generation state for one text: token ids, the KV cache and the steps taken."""

    def __init__(
        self,
        model: GPT2,
        tokenizer: tiktoken.Encoding,
        prompt: str | list[int],
        config: SamplingConfig | None = None,
        top_n: int = 10,
        record: bool = False,
        interventions: Sequence[Intervention] = (),
    ) -> None:
        """`record=True` keeps, for every position read, its residual stream, embeddings and the
        log-probability of each token: with the KV cache, everything a UI shows for the whole text
        (attention and the logit lens are recomputed from them exactly, on demand).
        `interventions` (see `interventions.py`) change every forward pass of this session; the
        records are those of the changed model."""
        if isinstance(top_n, bool) or not isinstance(top_n, int) or not 10 <= top_n <= 1000:
            raise ValueError(f"top_n must be an integer in [10, 1000], got {top_n!r}")
        self.model, self.tokenizer = model, tokenizer
        self.config = config if config is not None else SamplingConfig()
        self.top_n = top_n
        ids = encode(tokenizer, prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [i for i in ids if not 0 <= i < model.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {model.cfg.vocab_size})")
        n_ctx = model.cfg.n_positions
        if len(ids) >= n_ctx:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens but the model's context holds {n_ctx}: "
                f"shorten it to at most {n_ctx - 1} tokens to leave room for generation"
            )
        self.prompt_ids = ids
        self._state = _State(list(ids))
        self._steps_nbytes = 0  # what the steps hold (`step_nbytes`), kept as they come: the store asks often
        self._kv = model.new_kv_cache()
        self.capture: Recorder | PerStep = (Recorder if record else PerStep)(model, self._kv, top_n)
        self._pending: Pending | None = None
        # Kept when the engine's pass read the prompt (`read_together`): what lets a session with the same
        # prompt take this reading (`adopt_prompt`).
        self._prompt_read: PromptReading | None = None
        self.plan: Plan = resolve(tuple(interventions), model, tokenizer)
        if record and not self.plan.recordable:
            raise InterventionError(
                "a recording session recomputes attention and the logit lens from the residual stream, so it cannot show "
                "patches of queries, scores, patterns, ln_final or logits: patch those in a session without record=True")

    @property
    def interventions(self) -> tuple:
        return self.plan.interventions

    @property
    def record(self) -> bool:
        return self.capture.recording

    @property
    def records(self) -> Records:
        return self.capture.records

    @property
    def ids(self) -> list[int]:
        return list(self._state.ids)

    @property
    def steps(self) -> list[Step]:
        return list(self._state.steps)

    @property
    def text(self) -> str:
        return decode_complete(self.tokenizer, self._state.ids)

    @property
    def nbytes(self) -> int:
        """Memory held by this session's KV cache, records and steps."""
        return self._kv.nbytes + self.capture.nbytes + self._steps_nbytes

    @property
    def room_left(self) -> int:
        """Tokens that can still be generated before the context is full."""
        return self.model.cfg.n_positions - len(self._state.ids)

    def rewind(self, n_generated: int) -> None:
        """Keep the prompt and the first `n_generated` generated tokens; forget the rest."""
        total = len(self._state.steps)
        if isinstance(n_generated, bool) or not isinstance(n_generated, int) or not 0 <= n_generated <= total:
            raise ValueError(f"can rewind to 0..{total} generated tokens, not {n_generated!r}")
        self._pending = None
        del self._state.steps[n_generated:]
        self._steps_nbytes = sum(map(step_nbytes, self._state.steps))
        del self._state.ids[len(self.prompt_ids) + n_generated:]
        # Re-read the prompt whole when rewinding to the start, so the first step replays exactly.
        self._kv.truncate(0 if n_generated == 0 else min(self._kv.length, len(self._state.ids) - 1))
        if self._kv.length < len(self.prompt_ids):
            self._prompt_read = None
        self.capture.truncate(self._kv.length, len(self._state.ids))

    def unread(self) -> list[int]:
        """The ids the next forward pass reads: the whole prompt at first, then the last token; empty
        while a pass is pending. (With `absorb`, how the engine runs this session's passes batched.)"""
        return [] if self._pending is not None else self._state.ids[self._kv.length:]

    @property
    def pending(self) -> bool:
        """A forward pass has been read whose token is not chosen yet."""
        return self._pending is not None

    @torch.no_grad()
    def _read(self) -> Pending:
        """The forward pass over the tokens not read yet (the whole prompt at first, then one token)."""
        if self._pending is None:
            start = self._kv.length
            self._pending = self.capture.read(self._state.ids, start, self.plan.hooks(start))
        return self._pending

    def absorb(self, start: int, normed: torch.Tensor, resid: torch.Tensor | np.ndarray, embed: torch.Tensor | np.ndarray,
               pos_embed: torch.Tensor | np.ndarray, logits: torch.Tensor | None = None, logprobs: list[float] | None = None) -> None:
        """Take in a forward pass run elsewhere (the engine's batched pass, `read_together`) over positions
        start.. of what this recording session had unread (`Recorder.absorb`)."""
        pending = self.capture.absorb(self._state.ids, start, normed, resid, embed, pos_embed, logits, logprobs)
        if pending is not None:
            self._pending = pending

    def absorb_same(self, other: "GenerationSession") -> None:
        """Take in what `other` just absorbed from a pass over the very same text, read afresh (`same_starts`):
        its records (the arrays are shared, never written again) and its pending choice."""
        self.capture.records = other.capture.records.shared()
        if other._pending is not None:
            self._pending = dataclasses.replace(other._pending, logits=other._pending.logits.clone())
        self._prompt_read = other._prompt_read

    @torch.no_grad()
    def adopt_prompt(self, other: "GenerationSession") -> bool:
        """Take `other`'s reading of the very same prompt instead of reading it again, if it has one from the
        engine's pass (its cache and records of the prompt's positions, the choice pending after it, the
        logits unembedded again from the kept row): bit for bit what this session's own pass would give,
        since that pass would read the same chunks and a row's numbers depend on nothing else. Only for a
        session that has read nothing yet and holds only its prompt, without interventions. Returns
        whether it did."""
        n = len(self.prompt_ids)
        if (other is self or not (self.record and other.record) or other.model is not self.model or other._prompt_read is None or self.plan or other.plan
                or other.prompt_ids != self.prompt_ids or self._state.ids != self.prompt_ids or self._kv.length
                or len(self.capture.records) or other._kv.length < n or len(other.capture.records) < n):
            return False
        self._kv.copy_from(other._kv, n)
        self.capture.records = records = other.capture.records.shared(n)
        self._pending = Pending(n - 1, other._prompt_read.logits(self.model).clone(), None, records.resid[n - 1].astype(np.float16), None, None)
        self._prompt_read = other._prompt_read
        return True

    def attention_pattern(self, layer: int, start: int, end: int) -> np.ndarray:
        """`[head, end - start, end]`: see `Recorder.attention_pattern` (needs `record=True`)."""
        return self.capture.attention_pattern(layer, start, end)

    def attention_row(self, position: int) -> np.ndarray:
        """`[layer, head, position + 1]` float32: what `position` attends to in every layer (see attention_pattern)."""
        return np.stack([self.attention_pattern(layer, position, position + 1)[:, 0] for layer in range(self.model.cfg.n_layer)])

    def logit_lens(self, start: int, end: int, top_n: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Top-n ids and probabilities `[layer + 1, end - start, top_n]`: see `Recorder.logit_lens` (needs `record=True`)."""
        return self.capture.logit_lens(start, end, top_n)

    def read(self) -> None:
        """Run the forward pass over any tokens not read yet, so that every token of the text is
        recorded (also the last one of a full context, which `peek` refuses to predict after)."""
        self._read()

    def model_distribution(self, position: int) -> torch.Tensor:
        """`[vocab]` the model's own next-token probabilities after `position` (needs `record=True`)."""
        return self.capture.model_distribution(position)

    def _check_room(self) -> None:
        if self.room_left <= 0:
            raise ContextLengthError(
                f"the text has reached the model's context of {self.model.cfg.n_positions} tokens; "
                f"rewind or start a new text to continue"
            )

    def peek(self) -> Prediction:
        """The model's next-token distribution for the text as it is, under the current config,
        without choosing (reads pending tokens if needed; the next `step` reuses that pass)."""
        self._check_room()
        pending = self._read()
        rows = distribution_rows(pending.logits[None], [self._state.ids], [self.config])
        (raw,), (final,) = row_entropies(rows)
        return Prediction(pending.position, candidate_rows([self], rows, [None])[0], raw, final)

    def step(self, force: int | None = None) -> Step:
        """Generate one token (or take `force` as it): exactly one forward pass."""
        return step_together([self], [force])[0]

    def _check_force(self, force: int | None) -> None:
        if force is not None and (isinstance(force, bool) or not isinstance(force, int) or not 0 <= force < self.model.cfg.vocab_size):
            raise ValueError(f"forced token id must be an integer in [0, {self.model.cfg.vocab_size}), got {force!r}")

    def _commit(self, pending: Pending, stats: "RowStats", i: int, token: int, method: str, record_logprob: bool = True) -> Step:
        """Append `token`, chosen from row i of `stats` after reading `pending.position`, as the next step."""
        cfg, model, ids = self.config, self.model, self._state.ids
        ids.append(token)
        if record_logprob:
            self.capture.chose(stats.logprob[i])
        step = Step(
            index=len(self._state.steps),
            position=pending.position,
            token_id=token,
            token_text=token_strings(self.tokenizer, [token])[0],
            text=decode_complete(self.tokenizer, ids),
            method=method,
            prob=stats.prob[i],
            rank=stats.rank[i],
            prob_final=stats.prob_final[i],
            rank_final=stats.rank_final[i],
            entropy=stats.entropy[i],
            entropy_final=stats.entropy_final[i],
            candidates=stats.candidates[i],
            attention=pending.attention,
            resid=pending.resid,
            lens_ids=pending.lens_ids,
            lens_probs=pending.lens_probs,
            config=cfg,
        )
        if token == ENDOFTEXT_ID and cfg.stop_at_eos:
            step.finish_reason, step.message = "eos", "the model ended the text with <|endoftext|>"
        elif self.room_left <= 0:
            step.finish_reason = "context"
            step.message = f"the text filled the model's context of {model.cfg.n_positions} tokens"
        self._state.steps.append(step)
        self._steps_nbytes += step_nbytes(step)
        return step

    @torch.no_grad()
    def replay(self, tokens: list[int], methods: str | None = None) -> int:
        """Take tokens this session's sampler chose elsewhere (on a GPU's copy of the model, `hardware.py`; or
        before the session was rebuilt): read them all in one pass, then make each one's step from the
        distribution recorded here, drawing again. `methods` ("s", "g" or "f" per token, as share links write
        them) marks the forced ones; a token the draw here does not give (another device rounded a draw the
        other way, or other settings drew it) is kept, as forced. Needs `record=True`. Returns how many tokens
        not marked forced were kept that way."""
        if not self.record:
            raise ValueError("replay needs a recording session (record=True)")
        tokens = [int(t) for t in tokens]
        if len(tokens) > self.room_left or any(not 0 <= t < self.model.cfg.vocab_size for t in tokens):
            raise ValueError("replay: the tokens do not fit the context or are not token ids")
        if not tokens:
            return 0
        forced = [m == "f" for m in methods] if methods is not None else [False] * len(tokens)
        if len(forced) != len(tokens):
            raise ValueError("replay: one method per token")
        ids = self._state.ids
        differ = 0

        def take(i: int, pending: Pending, logprob_known: bool) -> None:
            nonlocal differ
            rows = distribution_rows(pending.logits[None], [ids], [self.config])
            chosen, method = choose_rows([self], [pending], rows, [None])[0]
            if forced[i]:
                method = "forced"
            elif chosen != tokens[i]:
                differ, method = differ + 1, "forced"
            self._commit(pending, RowStats.of([self], rows, [tokens[i]]), 0, tokens[i], method, record_logprob=not logprob_known)

        first = self._read()
        self._pending = None
        take(0, first, False)
        if len(tokens) == 1:
            return differ
        n = len(ids)  # the first new token is read here, with all the others but the last, in one pass
        ids.extend(tokens[1:-1])
        last = self.capture.read(ids, n - 1, self.plan.hooks(n - 1))  # also records the log-probability of tokens[1:-1]
        del ids[n:]
        middle = range(n - 1, n - 3 + len(tokens))  # the positions read before tokens[1:-1]
        for chunk in range(0, len(middle), 64):  # their logits in products of 64 rows
            rows = list(middle[chunk:chunk + 64])
            logits = self.capture.logits_of(rows)
            for j, position in enumerate(rows):
                take(1 + chunk + j, Pending(position, logits[j], None, self.records.resid[position].astype(np.float16), None, None), True)
        take(len(tokens) - 1, last, False)
        return differ

    def run(self, max_new_tokens: int | None = None, force: dict[int, int] | None = None) -> Iterator[Step]:
        """Stream up to `max_new_tokens` (default: the config's) more steps.

        Stops early after `<|endoftext|>` (if `stop_at_eos`) or when the context is full.
        `force` maps a step index (counted over the whole generation) to a token id.
        """
        budget = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        force = force or {}
        for n in range(budget):
            if self.room_left <= 0:
                return
            step = self.step(force=force.get(len(self._state.steps)))
            if step.finish_reason is None and n == budget - 1:
                step.finish_reason, step.message = "max_new_tokens", f"generated {budget} tokens (max_new_tokens)"
            yield step
            if step.finish_reason is not None:
                return


@torch.no_grad()
def step_together(sessions: Sequence[GenerationSession], forces: Sequence[int | None]) -> list[Step]:
    """`GenerationSession.step` for several sessions of one model at once (the engine's batch, once its pass
    has read them all): each takes the token it would take alone and its `Step` holds the same numbers, bit
    for bit (a row's softmax, cumulative sums, ranks and top candidates do not depend on the other rows), but
    the sampler's work over the vocabulary is a few calls for all rows instead of ~25 per session."""
    for s, force in zip(sessions, forces):
        s._check_room()
        s._check_force(force)
    pendings = [s._read() for s in sessions]
    rows = distribution_rows(torch.stack([p.logits for p in pendings]), [s._state.ids for s in sessions], [s.config for s in sessions])
    chosen = choose_rows(sessions, pendings, rows, forces)
    stats = RowStats.of(sessions, rows, [token for token, _ in chosen])
    steps = []
    for i, (s, pending, (token, method)) in enumerate(zip(sessions, pendings, chosen)):
        s._pending = None
        steps.append(s._commit(pending, stats, i, token, method))
    return steps


def rehearse(model: GPT2, tokenizer: tiktoken.Encoding, rows: int) -> None:
    """A batched pass and choice of `rows` throwaway one-token texts, dropped at once: after the heap was handed back
    to the OS (`memory.trim`, when the server is idle), this maps again the memory such a pass works in (a class's
    30 rows of 50,257 probabilities, their float64 sums, the products' results: ~9,000 pages for gpt2, which the
    next class's first choice would otherwise wait for the OS to map one by one). Nothing of it is kept, and the
    capacity the last real texts started at (`SLABS.start_key`, whose spare rows stay written) is left as it was."""
    key = SLABS.start_key
    try:
        sessions = [GenerationSession(model, tokenizer, [i % model.cfg.vocab_size], SamplingConfig(seed=i), record=True)
                    for i in range(rows)]
        read_together(sessions)
        step_together(sessions, [None] * rows)
    finally:
        if key is not None:  # (before any text started, the rehearsal's is the key `SLABS.warm` is given)
            SLABS.start_key = key


def choose_rows(sessions: Sequence[GenerationSession], pendings: Sequence[Pending], rows: DistributionRows,
                forces: Sequence[int | None]) -> list[tuple[int, str]]:
    """Each session's token and how it came: forced, the likeliest (temperature 0), or the draw of
    (seed, position + 1) from its final distribution (row i of `rows`)."""
    sampled = [i for i, (s, f) in enumerate(zip(sessions, forces)) if f is None and not s.config.greedy]
    finals = rows.probs_final if len(sampled) == len(sessions) else rows.probs_final[sampled]  # no copy when all draw
    us = [uniform(sessions[i].config.seed, pendings[i].position + 1) for i in sampled]
    drawn = dict(zip(sampled, draw_rows(finals, us))) if sampled else {}
    likeliest = rows.probs_final.argmax(-1).tolist() if len(sampled) < len(sessions) else []
    return [(f, "forced") if f is not None else (drawn[i], "sampled") if i in drawn else (likeliest[i], "greedy")
            for i, f in enumerate(forces)]


@dataclass
class RowStats:
    """What a `Step` says of its token and distribution, for each row of a `DistributionRows` (lists, one item a row)."""

    prob: list[float]
    logprob: list[float]
    prob_final: list[float]
    rank: list[int]
    rank_final: list[int]
    entropy: list[float]
    entropy_final: list[float]
    candidates: list[list[Candidate]]

    @classmethod
    def of(cls, sessions: Sequence[GenerationSession], rows: DistributionRows, tokens: Sequence[int]) -> "RowStats":
        at = torch.tensor(list(tokens), dtype=torch.long)[:, None]
        prob = rows.probs.gather(1, at)[:, 0]
        same = rows.probs_final is rows.probs
        raw_entropy, final_entropy = row_entropies(rows)
        raw_rank = ranks(rows.probs, tokens)
        probs = prob.tolist()
        # The log in Python, of each float32 probability: torch's log of a vector takes its SIMD path for some rows
        # and its scalar one for others, depending on how many rows there are.
        return cls(probs, [math.log(x) if x > 0 else -math.inf for x in probs], probs if same else rows.probs_final.gather(1, at)[:, 0].tolist(),
                   raw_rank, raw_rank if same else ranks(rows.probs_final, tokens),
                   raw_entropy, final_entropy, candidate_rows(sessions, rows, tokens))


def candidate_rows(sessions: Sequence[GenerationSession], rows: DistributionRows, chosen: Sequence[int | None]) -> list[list[Candidate]]:
    """Each row's candidates: its session's `top_n` likeliest under the model, those of the final distribution
    not among them, and the chosen token; most likely (final, then model) first, with every stage's value."""
    top: dict[int, tuple] = {}
    for n in {s.top_n for s in sessions}:
        final = torch.topk(rows.probs_final, n, -1)
        model_top = final.indices if rows.probs_final is rows.probs else torch.topk(rows.probs, n, -1).indices
        top[n] = (model_top.tolist(), final.indices.tolist(), final.values.tolist())
    picked = []
    for i, (s, token) in enumerate(zip(sessions, chosen)):
        model_top, final_ids, final_probs = (t[i] for t in top[s.top_n])
        ids = model_top + [j for j, p in zip(final_ids, final_probs) if p > 0 and j not in model_top]
        if token is not None and token not in ids:
            ids.append(token)
        picked.append(ids)
    width = max(len(ids) for ids in picked)
    at = torch.tensor([ids + ids[:1] * (width - len(ids)) for ids in picked], dtype=torch.long)
    # Each stage's values read in one gather (not 4 x len(ids) scalar reads, each a torch call that gives up
    # the interpreter lock: on a busy server every one of them waits to get it back).
    stages = [t.gather(1, at).tolist() for t in (rows.logits, rows.probs, rows.probs_temperature, rows.probs_final)]
    out = []
    for i, (s, ids) in enumerate(zip(sessions, picked)):
        logit, prob, prob_t, final = (stage[i] for stage in stages)
        order = sorted(range(len(ids)), key=lambda k: (-final[k], -prob[k]))
        texts = token_strings(s.tokenizer, [ids[k] for k in order])
        out.append([Candidate(ids[k], t, logit[k], prob[k], prob_t[k], final[k]) for k, t in zip(order, texts)])
    return out


@torch.no_grad()
def read_together(sessions: list[GenerationSession], segments: list[list[int]] | None = None,
                  later: list[Callable[[], None]] | None = None) -> int:
    """One batched pass (`GPT2.forward_ragged`) over recording sessions of one model: session i reads
    `segments[i]` (default: all its `unread()` ids; a leading chunk of them is allowed), each with its own
    interventions, then takes its rows in (`absorb`). The last rows of the sessions whose text is then read
    are unembedded in one product, and the log-probabilities of the tokens already in the texts in another
    (`known_logprobs`). Returns the number of rows.

    With `later` (a list), that second product is left to a function appended to it: the sessions' records
    hold NaN for those tokens until it runs. The engine chooses the next tokens first, so that a class's
    first tokens do not wait for the scoring of thirty prompts (a third of the pass that reads them)."""
    model = sessions[0].model
    segments = [s.unread() for s in sessions] if segments is None else segments
    starts = [len(s.records) for s in sessions]
    group = same_starts(sessions, segments)
    run = sorted(set(group))  # the sessions the pass computes; group[i]: the one whose rows session i takes
    out = model.forward_ragged([list(segments[i]) for i in run], [sessions[i]._kv for i in run], [sessions[i].plan for i in run])
    row_group = {i: k for k, i in enumerate(run)}
    for i, s in enumerate(sessions):
        if group[i] != i:
            s._kv.copy_from(sessions[group[i]]._kv)
    complete = [i for i, (s, ids) in enumerate(zip(sessions, segments)) if starts[i] + len(ids) == len(s._state.ids)]
    last_rows = sorted({row_group[group[i]] for i in complete})
    logits = dict(zip(last_rows, model.unembed_rows(out.normed[[out.bounds[k + 1] - 1 for k in last_rows]]).float().cpu().unbind(0))) if last_rows else {}
    absorbing = [i for i, s in enumerate(sessions) if not (group[i] != i and sessions[group[i]]._state.ids == s._state.ids)]
    wanted = {}
    for i in absorbing:
        k = row_group[group[i]]
        wanted[i] = (ids := sessions[i]._state.ids, starts[i], k, known_rows(ids, starts[i], out.bounds[k + 1] - out.bounds[k]))
    if later is None:
        logprobs = known_logprobs(model, out, wanted)
    else:  # (the counts are taken now: by the time `score` runs, the texts have their next tokens)
        logprobs = {i: [math.nan] * n for i, (_, _, _, n) in wanted.items()}

        def score() -> None:
            for i, got in known_logprobs(model, out, wanted).items():
                sessions[i].records.logprobs[starts[i] + 1:starts[i] + 1 + len(got)] = got
            for i, s in enumerate(sessions):
                if i not in wanted:  # took its donor's records: a copy of the list, NaN where the donor's now are not
                    a, b = starts[i] + 1, starts[i] + 1 + len(logprobs[group[i]])
                    s.records.logprobs[a:b] = sessions[group[i]].records.logprobs[a:b]

        later.append(score)
    # The captures as numpy once for the whole pass: each session then copies its rows with numpy alone (a few
    # torch calls per session otherwise, each of which waits for the interpreter lock again on a busy server).
    resid, embed, pos_embed = (t.float().cpu().numpy() for t in (out.resid, out.embed, out.pos_embed))
    for i, s in enumerate(sessions):
        donor, k = sessions[group[i]], row_group[group[i]]
        if i not in logprobs:
            s.absorb_same(donor)  # the same text: the same records (the donor absorbed first: it comes first)
            continue
        rows = out.rows(k)
        mine = logits[k] if i in complete else None
        mine = mine.clone() if mine is not None and donor is not s else mine
        s.absorb(starts[i], out.normed[rows], resid[:, rows], embed[rows], pos_embed[rows], mine, logprobs[i])
        if not s.plan and len(s.records) == len(s.prompt_ids) and starts[i] + len(segments[i]) == len(s.prompt_ids):
            s._prompt_read = PromptReading(out.normed[out.bounds[k + 1] - 1].clone())  # the prompt read whole by this pass's body
    return sum(len(segments[i]) for i in run)


def known_logprobs(model: GPT2, out, wanted: dict[int, tuple[list[int], int, int, int]]) -> dict[int, list[float]]:
    """For each session i, `wanted[i]` = (its ids, where its rows start, its sequence in the pass `out`, how
    many of those rows have their next token in the text, `recording.known_rows`): the log-probabilities of
    those tokens, for every session of the pass in one product (a class's 30 prompts are 30 small products
    otherwise, a third of the pass that reads them). The packed unembedding gives a row the same numbers in
    any product."""
    rows: list[int] = []
    targets: list[int] = []
    spans = {}
    for i, (ids, start, k, n) in wanted.items():
        first = out.bounds[k]
        spans[i] = (len(rows), n)
        rows += range(first, first + n)
        targets += ids[start + 1:start + 1 + n]
    got = next_token_logprobs(model, out.normed[rows], targets) if rows else []
    return {i: got[a:a + n] for i, (a, n) in spans.items()}


def same_starts(sessions: list[GenerationSession], segments: list[list[int]]) -> list[int]:
    """For each session, the first one in the list that starts the very same text afresh (the same ids from
    position 0, the same model, no interventions), else itself. Those get the same numbers, bit for bit (a
    pass's numbers for a sequence depend on nothing else), so a pass computes them once and the others copy
    them: a class that presses Generate on one example costs one prompt's reading, not thirty."""
    first: dict[tuple, int] = {}
    group = list(range(len(sessions)))
    for i, (s, ids) in enumerate(zip(sessions, segments)):
        key = fresh_key(s, ids)
        if key is not None:
            group[i] = first.setdefault(key, i)
    return group


def fresh_key(session: GenerationSession, ids: list[int]) -> tuple | None:
    """What sessions that read `ids` from position 0 share if their numbers are the same (`same_starts`):
    the model and the ids; None for a session that has read something, or has interventions."""
    if len(session.records) or session._kv.length or session.plan:
        return None
    return id(session.model), tuple(ids)


def generate(
    model: GPT2,
    tokenizer: tiktoken.Encoding,
    prompt: str | list[int],
    config: SamplingConfig | None = None,
    top_n: int = 10,
    force: dict[int, int] | None = None,
) -> Iterator[Step]:
    """Yield one `Step` per generated token, as soon as it is computed (KV cache: one forward each)."""
    session = GenerationSession(model, tokenizer, prompt, config, top_n)
    yield from session.run(force=force)


def decode_complete(tokenizer: tiktoken.Encoding, ids: list[int]) -> str:
    """Decode ids to text, holding back the bytes of a character that is not complete yet."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return decoder.decode(tokenizer.decode_bytes(ids), final=False)
