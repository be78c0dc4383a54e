"""What a generation session captures from its forward passes, two ways.

`Recorder` (a recording session, what the page runs): every position's residual stream, embeddings and
log-probability, from which, with the KV cache, every view is recomputed exactly on demand
(`attention_pattern`, `logit_lens`, `model_distribution`). `PerStep` (the library's default): each
step carries its own attention row and logit lens, computed in the pass. `GenerationSession` holds one
of them and calls it; it does not branch on which.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .capture import attention_from_keys, capture_hooks, logit_lens, next_token_logprobs, read_position, stacked_captures
from .model import GPT2, KVCache


@dataclass
class Pending:
    """A forward pass whose token has not been chosen yet."""

    position: int
    logits: torch.Tensor  # [vocab] float32 on the CPU: sampling is the same on every device
    attention: np.ndarray | None  # [layer, head, key] float16 (PerStep only)
    resid: np.ndarray  # [layer + 1, d_model] float16
    lens_ids: np.ndarray | None  # (PerStep only)
    lens_probs: np.ndarray | None


def known_rows(ids: list[int], start: int, T: int) -> int:
    """How many of a pass's T rows from `start` have their next token already in the text `ids` (all of them
    but the last when the pass reaches the end of the text): their tokens' log-probabilities are recorded."""
    return T - 1 if start + T == len(ids) else T


class Records:
    """Per-position captures kept by a recording session (index = position).

    resid[p] `[layer + 1, d_model]` float32 (with the KV cache, enough to recompute every attention
    pattern: `Recorder.attention_pattern`),
    embed[p] / pos_embed[p] `[d_model]` float32, logprobs[t] = log p(token t | tokens < t)
    (NaN for t = 0; and while the engine holds the session, for the tokens of a pass it has not scored yet:
    `generation.read_together`), one per token of the text; lens[p]: the logit lens of position p once read,
    (ids, probs) `[layer + 1, LENS_TOP]` (`Recorder.logit_lens`).
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
        # Every position's rows have one shape (and every lens entry one): the store sums this for every
        # session on every request, so it must not walk every array.
        rows = self.resid[0].nbytes + self.embed[0].nbytes + self.pos_embed[0].nbytes if self.resid else 0
        lens = sum(a.nbytes for a in next(iter(self.lens.values()))) if self.lens else 0
        return len(self.resid) * rows + len(self.lens) * lens

    def add(self, start, resid, embed, pos_embed, known_logprobs: list[float]) -> None:
        """Store rows for positions start..start+T-1 from one forward pass, and the log-probabilities
        of the tokens at start+1..start+T-1 (already in the text when the pass ran)."""
        T = resid.shape[1]
        # copies: rows sliced from a batched pass must not keep the whole batch's tensors alive
        res, emb, pos = (np.array(t if isinstance(t, np.ndarray) else t.float().cpu().numpy(), dtype=np.float32, copy=True)
                         for t in (resid, embed, pos_embed))
        for r in range(T):
            self.resid.append(res[:, r])
            self.embed.append(emb[r])
            self.pos_embed.append(pos[r])
        if start == 0:
            self.logprobs = [float("nan")]
        self.logprobs += known_logprobs

    def shared(self, n: int | None = None) -> "Records":
        """The records of the first `n` positions (default: all) as a new `Records` that shares these arrays
        (never written again once stored; a session that reads the same text takes another's this way)."""
        out = Records()
        out.resid, out.embed, out.pos_embed = self.resid[:n], self.embed[:n], self.pos_embed[:n]
        out.logprobs = self.logprobs[:n]  # all of them by default: a chunk's pass knows one more token than its rows
        out.lens = {p: v for p, v in self.lens.items() if n is None or p < n}
        return out

    def truncate(self, n_positions: int, n_tokens: int) -> None:
        for rows in (self.resid, self.embed, self.pos_embed):
            del rows[n_positions:]
        self.lens = {p: v for p, v in self.lens.items() if p < n_positions}
        del self.logprobs[n_tokens if n_positions else 0:]


class PerStep:
    """Each step's pass computes its own attention row and logit lens; nothing is kept between steps."""

    recording = False

    def __init__(self, model: GPT2, kv: KVCache, top_n: int) -> None:
        self.model, self.kv, self.top_n = model, kv, top_n
        self.records = Records()  # stays empty

    @property
    def nbytes(self) -> int:
        return 0

    def read(self, ids: list[int], start: int, hooks: list) -> Pending:
        """The pass over ids[start:]: for one new token the attention row comes straight from the forward
        pass; for a prompt the fused attention kernel runs and the last row is recomputed from the cached keys."""
        model = self.model
        new = torch.tensor([ids[start:]], device=model.device)
        store: dict = {}
        read_one = new.shape[1] == 1
        with model.hooks(hooks + capture_hooks(model, store, rows=slice(-1, None), patterns=read_one)):
            normed = model(new, kv_cache=self.kv, last_only=True, unembed=False)[0]  # [1, d_model]
        patterns, resid = stacked_captures(model, store, with_attention=read_one)  # [layer, head, 1, key], [layer + 1, 1, d_model]
        if read_one:
            attention = patterns[:, :, -1]
        else:
            attention = torch.stack([attention_from_keys(model, layer, resid[layer, -1:], self.kv.keys(layer)[0], len(ids) - 1)[:, 0]
                                     for layer in range(model.cfg.n_layer)]).to(torch.float16)
        logits, lens_ids, lens_probs = read_position(model, resid[:, -1], normed[-1], self.top_n)
        return Pending(len(ids) - 1, logits.float().cpu(), attention.cpu().numpy(), resid[:, -1].float().cpu().numpy().astype(np.float16),
                       lens_ids.cpu().numpy().astype(np.int32), lens_probs.cpu().numpy().astype(np.float16))

    def chose(self, logprob: float) -> None:
        pass

    def truncate(self, n_positions: int, n_tokens: int) -> None:
        pass

    def absorb(self, ids, start, normed, resid, embed, pos_embed, logits=None, logprobs=None) -> Pending | None:
        raise ValueError("absorb needs a recording session (record=True)")

    def _refuse(self, what: str):
        raise ValueError(f"{what} needs a recording session (record=True)")

    def attention_pattern(self, layer: int, start: int, end: int) -> np.ndarray:
        self._refuse("attention_pattern")

    def logit_lens(self, start: int, end: int, top_n: int = 1):
        self._refuse("logit_lens")

    def model_distribution(self, position: int) -> torch.Tensor:
        self._refuse("model_distribution")


class Recorder:
    """Keeps every position's residual stream, embeddings and log-probability (`Records`); recomputes every
    view from them and the KV cache, exactly as the pass computed it."""

    recording = True

    def __init__(self, model: GPT2, kv: KVCache, top_n: int) -> None:
        self.model, self.kv, self.top_n = model, kv, top_n
        self.records = Records()

    @property
    def nbytes(self) -> int:
        return self.records.nbytes

    def read(self, ids: list[int], start: int, hooks: list) -> Pending:
        model, store = self.model, {}
        with model.hooks(hooks + capture_hooks(model, store, patterns=False)):
            normed = model(torch.tensor([ids[start:]], device=model.device), kv_cache=self.kv, unembed=False)[0]  # [T, d_model]
        _, resid = stacked_captures(model, store, with_attention=False)  # [layer + 1, T, d_model]
        return self.absorb(ids, start, normed, resid, store["embed"], store["pos_embed"])

    @torch.no_grad()
    def absorb(self, ids: list[int], start: int, normed: torch.Tensor, resid: torch.Tensor | np.ndarray,
               embed: torch.Tensor | np.ndarray, pos_embed: torch.Tensor | np.ndarray, logits: torch.Tensor | None = None, logprobs: list[float] | None = None) -> Pending | None:
        """Take in a forward pass over positions start..start+T-1 of `ids` (what the session had unread, or a
        leading chunk of it): final-layer-normed rows `[T, d_model]`, residual stream `[layer + 1, T, d_model]`,
        embeddings `[T, d_model]`, and, when the pass reached the last token, that row's `logits` `[vocab]` if
        already computed (the engine unembeds the last rows of a whole batch in one product). `logprobs`: those
        of the tokens at start+1.. already in the text (`known_rows`), if already computed (the engine computes
        every session's of a pass in one product). Returns the pending choice when the pass reached the last token."""
        if start != len(self.records):
            raise ValueError(f"absorb needs the pass that starts at {len(self.records)}, got {start}")
        T = normed.shape[0]
        complete = start + T == len(ids)
        if logprobs is None:
            known = normed[:known_rows(ids, start, T)]
            logprobs = next_token_logprobs(self.model, known, ids[start + 1:start + 1 + known.shape[0]]) if known.shape[0] else []
        self.records.add(start, resid, embed, pos_embed, logprobs)
        if not complete:
            return None
        if logits is None:
            logits = self.model.unembed(normed[-1]).float()
        last = resid[:, -1] if isinstance(resid, np.ndarray) else resid[:, -1].float().cpu().numpy()
        return Pending(len(ids) - 1, logits.float().cpu(), None, last.astype(np.float16), None, None)

    def chose(self, logprob: float) -> None:
        """The token chosen after the last position: its log-probability under the model."""
        self.records.logprobs.append(logprob)

    def truncate(self, n_positions: int, n_tokens: int) -> None:
        self.records.truncate(n_positions, n_tokens)

    def attention_pattern(self, layer: int, start: int, end: int) -> np.ndarray:
        """Attention in `layer` of the queries start..end-1 over keys 0..end-1: `[head, end - start, end]`
        float32, zeros above the diagonal (positions already read). Recomputed from the recorded
        residual stream and the KV cache: exactly the forward pass's softmax, without storing a pattern
        per position."""
        n = len(self.records)
        if not 0 <= start < end <= n:
            raise ValueError(f"attention_pattern needs 0 <= start < end <= {n}, got {start}, {end}")
        if not 0 <= layer < self.model.cfg.n_layer:
            raise ValueError(f"layer must be in [0, {self.model.cfg.n_layer}), got {layer}")
        resid = self.recorded_resid(range(start, end))[layer]  # [n, d_model]
        return attention_from_keys(self.model, layer, resid, self.kv.keys(layer)[0], start).float().cpu().numpy()

    def logit_lens(self, start: int, end: int, top_n: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The logit lens of positions start..end-1: what each layer's residual stream, read through the
        final layer norm and the unembedding, predicts next. Top-n ids `[layer + 1, end - start, top_n]` int64
        and probabilities (float32); row 0 reads the embeddings, the last row is the model's own next-token
        distribution. Positions are read once and kept (up to the top `Records.LENS_TOP`), so a view that
        slides by one token after a step reads only the new position."""
        n = len(self.records)
        if not 0 <= start < end <= n:
            raise ValueError(f"logit_lens needs 0 <= start < end <= {n}, got {start}, {end}")
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
        ids, probs = logit_lens(self.model, self.recorded_resid(positions), top_n)
        return ids.cpu().numpy(), probs.float().cpu().numpy()

    def recorded_resid(self, positions) -> torch.Tensor:
        """The recorded residual stream of `positions` as the model's tensor: `[layer + 1, n, d_model]`."""
        resid = torch.from_numpy(np.stack([self.records.resid[p] for p in positions], axis=1))
        return resid.to(self.model.device, self.model.wte.weight.dtype)

    @torch.no_grad()
    def logits_at(self, position: int) -> torch.Tensor:
        """`[vocab]` float32 the model's next-token logits after reading `position` (from the recorded stream)."""
        return self.logits_of([position])[0]

    @torch.no_grad()
    def logits_of(self, positions: list[int]) -> torch.Tensor:
        """`[len(positions), vocab]` float32 on the CPU: `logits_at` of several positions, in one product."""
        if not all(0 <= p < len(self.records) for p in positions):
            raise ValueError(f"logits_at needs 0 <= position < {len(self.records)}, got {positions}")
        return self.model.unembed(self.model.ln_f(self.recorded_resid(positions)[-1])).float().cpu()

    @torch.no_grad()
    def model_distribution(self, position: int) -> torch.Tensor:
        """The model's own next-token probabilities after reading `position`: `[vocab]` float32, from the
        recorded last residual stream through ln_f and the unembedding."""
        if not 0 <= position < len(self.records):
            raise ValueError(f"model_distribution needs 0 <= position < {len(self.records)}, got {position}")
        return torch.softmax(self.logits_at(position), -1)
