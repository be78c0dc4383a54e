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
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import tiktoken
import torch

from .capture import attention_from_keys, capture_hooks, logit_lens, next_token_logprobs, read_position, stacked_captures
from .interventions import Intervention, Plan, resolve
from .model import GPT2, ContextLengthError
from .sampling import SamplingConfig, distributions, draw, entropy, rank_of, step_generator
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


@dataclass
class Prediction:
    """The next-token distribution for the text as it stands, before anything is chosen."""

    position: int  # the position read; the candidates are for position + 1
    candidates: list[Candidate]
    entropy: float
    entropy_final: float


@dataclass
class _Pending:
    """A forward pass whose token has not been chosen yet."""

    position: int
    logits: torch.Tensor  # [vocab]
    attention: np.ndarray | None  # [layer, head, key] float16
    resid: np.ndarray  # [layer + 1, d_model] float16
    lens_ids: np.ndarray | None
    lens_probs: np.ndarray | None


@dataclass
class _State:
    ids: list[int]
    steps: list[Step] = field(default_factory=list)


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
        self._kv = model.new_kv_cache()
        self.record = record
        self.records = Records()
        self._pending: _Pending | None = None
        self.plan: Plan = resolve(tuple(interventions), model, tokenizer)

    @property
    def interventions(self) -> tuple:
        return self.plan.interventions

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
        """Memory held by this session's KV cache and records."""
        return self._kv.nbytes + self.records.nbytes

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
        del self._state.ids[len(self.prompt_ids) + n_generated:]
        # Re-read the prompt whole when rewinding to the start, so the first step replays exactly.
        self._kv.truncate(0 if n_generated == 0 else min(self._kv.length, len(self._state.ids) - 1))
        self.records.truncate(self._kv.length, len(self._state.ids))

    def unread(self) -> list[int]:
        """The ids the next forward pass reads: the whole prompt at first, then the last token; empty
        while a pass is pending. (With `absorb`, how the engine runs this session's passes batched.)"""
        return [] if self._pending is not None else self._state.ids[self._kv.length:]

    @property
    def pending(self) -> bool:
        """A forward pass has been read whose token is not chosen yet."""
        return self._pending is not None

    @torch.no_grad()
    def _read(self) -> _Pending:
        """The forward pass over the tokens not read yet (the whole prompt at first, then one token)."""
        if self._pending is not None:
            return self._pending
        model, ids = self.model, self._state.ids
        start = self._kv.length
        new = torch.tensor([ids[start:]], device=model.device)
        store: dict = {}
        if self.record:
            # A recording session keeps the residual stream of every position, from which (with the
            # KV cache) `attention_pattern` and `logit_lens` recompute exactly what a view shows; it
            # computes neither per step.
            with model.hooks(self.plan.hooks(start) + capture_hooks(model, store, patterns=False)):
                normed = model(new, kv_cache=self._kv, unembed=False)[0]  # [T, d_model]
            _, resid = stacked_captures(model, store, with_attention=False)  # [layer + 1, T, d_model]
            self.absorb(start, normed, resid, store["embed"], store["pos_embed"])
            return self._pending
        # Otherwise each step carries its attention row and lens: for one new token the row comes
        # straight from the forward pass; for a prompt the fused attention kernel runs and the last
        # row is recomputed from the cached keys.
        read_one = new.shape[1] == 1
        with model.hooks(self.plan.hooks(start) + capture_hooks(model, store, rows=slice(-1, None), patterns=read_one)):
            normed = model(new, kv_cache=self._kv, last_only=True, unembed=False)[0]  # [1, d_model]
        patterns, resid = stacked_captures(model, store, with_attention=read_one)  # [layer, head, 1, key], [layer + 1, 1, d_model]
        if read_one:
            attention = patterns[:, :, -1]
        else:
            attention = torch.stack([self._attention_of(layer, resid[layer, -1:], len(ids) - 1)[:, 0]
                                     for layer in range(model.cfg.n_layer)]).to(torch.float16)
        logits, lens_ids, lens_probs = read_position(model, resid[:, -1], normed[-1], self.top_n)
        self._pending = _Pending(
            position=len(ids) - 1,
            logits=logits,
            attention=attention.cpu().numpy(),  # float16
            resid=resid[:, -1].float().cpu().numpy().astype(np.float16),
            lens_ids=lens_ids.cpu().numpy().astype(np.int32),
            lens_probs=lens_probs.cpu().numpy().astype(np.float16),
        )
        return self._pending

    @torch.no_grad()
    def absorb(self, start: int, normed: torch.Tensor, resid: torch.Tensor, embed: torch.Tensor, pos_embed: torch.Tensor,
               logits: torch.Tensor | None = None) -> None:
        """Take in a recording session's forward pass over positions start..start+T-1 (`unread()` or a
        leading chunk of it): final-layer-normed rows `[T, d_model]`, residual stream `[layer + 1, T, d_model]`,
        embeddings `[T, d_model]`, and, when the pass reached the last token, that row's `logits` `[vocab]`
        if already computed (the engine unembeds the last rows of a whole batch in one product)."""
        if not self.record or start != len(self.records):
            raise ValueError(f"absorb needs a recording session and the pass that starts at {len(self.records)}, got {start}")
        ids, T = self._state.ids, normed.shape[0]
        complete = start + T == len(ids)
        known = normed[:-1] if complete else normed  # rows whose next token is already in the text
        logprobs = next_token_logprobs(self.model, known, ids[start + 1:start + 1 + known.shape[0]]) if known.shape[0] else []
        self.records.add(start, resid, embed, pos_embed, logprobs)
        if complete:
            if logits is None:
                logits = self.model.unembed(normed[-1]).float()
            self._pending = _Pending(len(ids) - 1, logits, None, resid[:, -1].float().cpu().numpy().astype(np.float16), None, None)

    def _attention_of(self, layer: int, resid_pre: torch.Tensor, start: int) -> torch.Tensor:
        """`[head, n, start + n]` attention of positions start.. in `layer`, from their residual stream and the cached keys."""
        return attention_from_keys(self.model, layer, resid_pre, self._kv.keys(layer)[0], start)

    def attention_pattern(self, layer: int, start: int, end: int) -> np.ndarray:
        """Attention in `layer` of the queries start..end-1 over keys 0..end-1: `[head, end - start, end]`
        float32, zeros above the diagonal (needs `record=True`; positions already read).

        Recomputed from the recorded residual stream and the KV cache: exactly the forward pass's
        softmax, without storing a pattern per position.
        """
        n = len(self.records)
        if not self.record or not 0 <= start < end <= n:
            raise ValueError(f"attention_pattern needs a recording session and 0 <= start < end <= {n}, got {start}, {end}")
        if not 0 <= layer < self.model.cfg.n_layer:
            raise ValueError(f"layer must be in [0, {self.model.cfg.n_layer}), got {layer}")
        resid = self._recorded_resid(range(start, end))[layer]  # [n, d_model]
        return self._attention_of(layer, resid, start).float().cpu().numpy()

    def attention_row(self, position: int) -> np.ndarray:
        """`[layer, head, position + 1]` float32: what `position` attends to in every layer (see attention_pattern)."""
        return np.stack([self.attention_pattern(layer, position, position + 1)[:, 0] for layer in range(self.model.cfg.n_layer)])

    def logit_lens(self, start: int, end: int, top_n: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The logit lens of positions start..end-1 (needs `record=True`): what each layer's residual
        stream, read through the final layer norm and the unembedding, predicts next.

        Returns top-n ids `[layer + 1, end - start, top_n]` int64 and probabilities (float32); row 0
        reads the embeddings, the last row is the model's own next-token distribution. Positions
        are read once and kept (up to the top `Records.LENS_TOP`), so a view that slides by one
        token after a step reads only the new position.
        """
        n = len(self.records)
        if not self.record or not 0 <= start < end <= n:
            raise ValueError(f"logit_lens needs a recording session and 0 <= start < end <= {n}, got {start}, {end}")
        if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= self.model.cfg.vocab_size:
            raise ValueError(f"top_n must be an integer in [1, {self.model.cfg.vocab_size}], got {top_n!r}")
        rec = self.records
        if top_n > rec.LENS_TOP:
            return self._read_lens(list(range(start, end)), top_n)
        missing = [p for p in range(start, end) if p not in rec.lens]
        if missing:
            ids, probs = self._read_lens(missing, rec.LENS_TOP)
            for i, p in enumerate(missing):
                rec.lens[p] = (ids[:, i].copy(), probs[:, i].copy())  # not views: each entry owns its few bytes
        rows = [rec.lens[p] for p in range(start, end)]
        return (np.stack([r[0] for r in rows], axis=1)[..., :top_n], np.stack([r[1] for r in rows], axis=1)[..., :top_n])

    def _read_lens(self, positions: list[int], top_n: int) -> tuple[np.ndarray, np.ndarray]:
        ids, probs = logit_lens(self.model, self._recorded_resid(positions), top_n)
        return ids.cpu().numpy(), probs.float().cpu().numpy()

    def _recorded_resid(self, positions) -> torch.Tensor:
        """The recorded residual stream of `positions` as the model's tensor: `[layer + 1, n, d_model]`."""
        resid = torch.from_numpy(np.stack([self.records.resid[p] for p in positions], axis=1))
        return resid.to(self.model.device, self.model.wte.weight.dtype)

    def read(self) -> None:
        """Run the forward pass over any tokens not read yet, so that every token of the text is
        recorded (also the last one of a full context, which `peek` refuses to predict after)."""
        self._read()

    @torch.no_grad()
    def model_distribution(self, position: int) -> torch.Tensor:
        """The model's own next-token probabilities after reading `position`: `[vocab]` float32
        (needs `record=True`), from the recorded last residual stream through ln_f and the unembedding."""
        if not self.record or not 0 <= position < len(self.records):
            raise ValueError(f"model_distribution needs a recording session and 0 <= position < {len(self.records)}, got {position}")
        final = self._recorded_resid([position])[-1]  # [1, d_model]
        return torch.softmax(self.model.unembed(self.model.ln_f(final)).float()[0], -1)

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
        dist = distributions(pending.logits, self._state.ids, self.config)
        raw = entropy(dist.probs)
        return Prediction(pending.position, self._candidates(dist, None), raw,
                          raw if dist.probs_final is dist.probs else entropy(dist.probs_final))

    def step(self, force: int | None = None) -> Step:
        """Generate one token (or take `force` as it): exactly one forward pass."""
        cfg, model = self.config, self.model
        self._check_room()
        if force is not None and (isinstance(force, bool) or not isinstance(force, int) or not 0 <= force < model.cfg.vocab_size):
            raise ValueError(f"forced token id must be an integer in [0, {model.cfg.vocab_size}), got {force!r}")
        ids = self._state.ids
        pending = self._read()
        dist = distributions(pending.logits, ids, cfg)
        if force is not None:
            token, method = force, "forced"
        elif cfg.greedy:
            token, method = int(torch.argmax(dist.probs_final)), "greedy"
        else:
            token, method = draw(dist.probs_final, step_generator(cfg.seed, pending.position + 1)), "sampled"
        self._pending = None
        ids.append(token)
        if self.record:
            self.records.logprobs.append(float(torch.log(dist.probs[token])))
        step = Step(
            index=len(self._state.steps),
            position=pending.position,
            token_id=token,
            token_text=token_strings(self.tokenizer, [token])[0],
            text=decode_complete(self.tokenizer, ids),
            method=method,
            prob=float(dist.probs[token]),
            rank=rank_of(dist.probs, token),
            prob_final=float(dist.probs_final[token]),
            rank_final=rank_of(dist.probs_final, token),
            entropy=(raw_entropy := entropy(dist.probs)),
            entropy_final=raw_entropy if dist.probs_final is dist.probs else entropy(dist.probs_final),
            candidates=self._candidates(dist, token),
            attention=pending.attention,
            resid=pending.resid,
            lens_ids=pending.lens_ids,
            lens_probs=pending.lens_probs,
        )
        if token == ENDOFTEXT_ID and cfg.stop_at_eos:
            step.finish_reason, step.message = "eos", "the model ended the text with <|endoftext|>"
        elif self.room_left <= 0:
            step.finish_reason = "context"
            step.message = f"the text filled the model's context of {model.cfg.n_positions} tokens"
        self._state.steps.append(step)
        return step

    def _candidates(self, dist, chosen: int | None) -> list[Candidate]:
        n = self.top_n
        ids = torch.topk(dist.probs, n).indices.tolist()
        final_top = torch.topk(dist.probs_final, n)
        ids += [i for i, p in zip(final_top.indices.tolist(), final_top.values.tolist()) if p > 0 and i not in ids]
        if chosen is not None and chosen not in ids:
            ids.append(chosen)
        ids.sort(key=lambda i: (-float(dist.probs_final[i]), -float(dist.probs[i])))
        texts = token_strings(self.tokenizer, ids)
        return [
            Candidate(i, t, float(dist.logits[i]), float(dist.probs[i]), float(dist.probs_temperature[i]), float(dist.probs_final[i]))
            for i, t in zip(ids, texts)
        ]

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
def read_together(sessions: list[GenerationSession], segments: list[list[int]] | None = None) -> int:
    """One batched pass (`GPT2.forward_ragged`) over recording sessions of one model: session i reads
    `segments[i]` (default: all its `unread()` ids; a leading chunk of them is allowed), each with its own
    interventions, then takes its rows in (`absorb`). The last rows of the sessions whose text is then read
    are unembedded in one product. Returns the number of rows."""
    model = sessions[0].model
    segments = [s.unread() for s in sessions] if segments is None else segments
    starts = [len(s.records) for s in sessions]
    out = model.forward_ragged([torch.tensor(ids) for ids in segments], [s._kv for s in sessions], [s.plan for s in sessions])
    complete = [i for i, (s, ids) in enumerate(zip(sessions, segments)) if starts[i] + len(ids) == len(s._state.ids)]
    logits = dict(zip(complete, model.unembed_rows(out.normed[[out.bounds[i + 1] - 1 for i in complete]]).float())) if complete else {}
    for i, s in enumerate(sessions):
        rows = out.rows(i)
        s.absorb(starts[i], out.normed[rows], out.resid[:, rows], out.embed[rows], out.pos_embed[rows], logits.get(i))
    return out.bounds[-1]


class Records:
    """Per-position captures kept by a recording session (index = position).

    resid[p] `[layer + 1, d_model]` float32 (with the KV cache, enough to recompute every attention
    pattern: `GenerationSession.attention_pattern`),
    embed[p] / pos_embed[p] `[d_model]` float32, logprobs[t] = log p(token t | tokens < t)
    (NaN for t = 0), one per token of the text; lens[p]: the logit lens of position p once read,
    (ids, probs) `[layer + 1, LENS_TOP]` (`GenerationSession.logit_lens`).
    """

    LENS_TOP = 10

    def __init__(self) -> None:
        self.resid: list[np.ndarray] = []
        self.embed: list[np.ndarray] = []
        self.pos_embed: list[np.ndarray] = []
        self.logprobs: list[float] = []
        self.lens: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.resid)

    @property
    def nbytes(self) -> int:
        return (sum(a.nbytes for rows in (self.resid, self.embed, self.pos_embed) for a in rows)
                + sum(ids.nbytes + probs.nbytes for ids, probs in self.lens.values()))

    def add(self, start, resid, embed, pos_embed, known_logprobs: list[float]) -> None:
        """Store rows for positions start..start+T-1 from one forward pass, and the log-probabilities
        of the tokens at start+1..start+T-1 (already in the text when the pass ran)."""
        T = resid.shape[1]
        # copies: rows sliced from a batched pass must not keep the whole batch's tensors alive
        res, emb, pos = (np.array(t.float().cpu().numpy(), copy=True) for t in (resid, embed, pos_embed))
        for r in range(T):
            self.resid.append(res[:, r])
            self.embed.append(emb[r])
            self.pos_embed.append(pos[r])
        if start == 0:
            self.logprobs = [float("nan")]
        self.logprobs += known_logprobs

    def truncate(self, n_positions: int, n_tokens: int) -> None:
        for rows in (self.resid, self.embed, self.pos_embed):
            del rows[n_positions:]
        self.lens = {p: v for p, v in self.lens.items() if p < n_positions}
        del self.logprobs[n_tokens if n_positions else 0:]


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
