"""Whole-text traces: everything gpt2viz shows about a text, from one forward pass, as numpy arrays.

Attention is stored packed: only the causal half (query >= key), as 8-bit fixed point
(probability x 255, rounded: within 1/510 of the float32 value, finer than any colour scale
or two-decimal label shows). A memory budget is checked before anything large is allocated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import tiktoken
import torch

from .capture import capture_hooks, dequantize_attention, log_probabilities_, logit_lens, stacked_captures, unembedded_blocks
from .model import GPT2, ContextLengthError
from .tokenizer import encode, token_strings

DEFAULT_MAX_TRACE_BYTES = int(os.environ.get("GPT2VIZ_MAX_TRACE_BYTES", 1 << 30))


class TraceBudgetError(MemoryError):
    """A trace would need more memory than the configured budget."""


@dataclass
class Trace:
    """The captured internals of GPT-2 reading one text.

    Shapes: L layers, H heads, T positions, C = d_model, N = top_n.
    """

    tokens: np.ndarray  # [T] int64
    token_strings: list[str]
    attention_packed: np.ndarray  # [L, H, T*(T+1)/2] uint8 codes (see dequantize_attention): row q holds keys 0..q
    resid: np.ndarray  # [L + 1, T, C] float16: after the embeddings, then after each block
    embed: np.ndarray  # [T, C] float16 token embedding
    pos_embed: np.ndarray  # [T, C] float16 position embedding
    top_ids: np.ndarray  # [T, N] int32: most likely next tokens after each position
    top_probs: np.ndarray  # [T, N] float32
    logprobs: np.ndarray  # [T] float32: log p(token t | tokens < t); NaN at t = 0
    lens_ids: np.ndarray  # [L + 1, T, N] int32: logit lens read from each resid row
    lens_probs: np.ndarray  # [L + 1, T, N] float16

    @property
    def n_layer(self) -> int:
        return self.attention_packed.shape[0]

    @property
    def n_head(self) -> int:
        return self.attention_packed.shape[1]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def surprisal(self) -> np.ndarray:
        """`[T]` -log p of each token given the ones before it, in nats (NaN at t = 0)."""
        return -self.logprobs

    def pattern(self, layer: int, head: int) -> np.ndarray:
        """Attention of one head `[query, key]` float32, zeros above the diagonal."""
        return unpack_causal(dequantize_attention(self.attention_packed[layer, head]), len(self))

    def attention_row(self, position: int) -> np.ndarray:
        """Attention of `position` over keys 0..position, all layers and heads: `[L, H, position + 1]`."""
        start = position * (position + 1) // 2
        return dequantize_attention(self.attention_packed[:, :, start:start + position + 1])

    @property
    def attention(self) -> np.ndarray:
        """All attention `[L, H, query, key]` float32 (materialised: T*T per head)."""
        T = len(self)
        out = np.zeros((self.n_layer, self.n_head, T, T), dtype=np.float32)
        rows, cols = np.tril_indices(T)
        out[:, :, rows, cols] = dequantize_attention(self.attention_packed)
        return out

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))


def unpack_causal(packed: np.ndarray, T: int) -> np.ndarray:
    """`[T*(T+1)/2]` lower-triangle values (row-major) -> `[T, T]` float32."""
    out = np.zeros((T, T), dtype=np.float32)
    out[np.tril_indices(T)] = packed
    return out


def trace_bytes(model: GPT2, n_tokens: int, top_n: int = 10) -> int:
    """Bytes a trace of `n_tokens` holds, plus the float32 work space of the largest layer's pattern."""
    c, T = model.cfg, n_tokens
    stored = (
        c.n_layer * c.n_head * T * (T + 1) // 2  # attention, uint8
        + (c.n_layer + 3) * T * c.n_embd * 2  # resid, embed, pos_embed
        + T * top_n * 8 + T * 4  # next-token top-N, logprobs
        + (c.n_layer + 1) * T * top_n * 6  # logit lens
    )
    work = 2 * c.n_head * T * T * 4  # one layer's float32 scores and pattern during the pass
    return stored + work


@torch.no_grad()
def trace(
    model: GPT2,
    tokenizer: tiktoken.Encoding,
    text: str | list[int],
    top_n: int = 10,
    max_bytes: int | None = None,
) -> Trace:
    """Run GPT-2 once over `text` and return its complete capture (see `Trace`)."""
    ids = encode(tokenizer, text) if isinstance(text, str) else [int(i) for i in text]
    if not ids:
        raise ValueError("the text is empty: give at least one token")
    T = len(ids)
    if T > model.cfg.n_positions:
        raise ContextLengthError(f"the text has {T} tokens but the model's context holds {model.cfg.n_positions}")
    budget = DEFAULT_MAX_TRACE_BYTES if max_bytes is None else max_bytes
    need = trace_bytes(model, T, top_n)
    if need > budget:
        raise TraceBudgetError(
            f"a trace of {T} tokens on this model needs about {need / 2**20:.0f} MiB, over the budget of "
            f"{budget / 2**20:.0f} MiB: use a shorter text (or raise GPT2VIZ_MAX_TRACE_BYTES)"
        )
    tokens = torch.tensor([ids], device=model.device)
    store: dict = {}
    with model.hooks(capture_hooks(model, store, pack=True, attention_dtype=torch.uint8)):
        normed = model(tokens, unembed=False)[0]  # [T, d_model]
    attention, resid = stacked_captures(model, store)  # [L, H, T*(T+1)/2] uint8, [L + 1, T, C]
    packed = attention.cpu().numpy()
    top_ids, top_logp = torch.empty(T, top_n, dtype=torch.long), torch.empty(T, top_n)
    token_logprobs = torch.full((T + 1,), float("nan"))  # [t + 1] = log p(token t + 1 | ..t); the last is unknown
    next_ids = torch.cat([tokens[0, 1:], tokens.new_zeros(1)])
    for start, logits in unembedded_blocks(model, normed):
        rows = slice(start, start + logits.shape[0])
        block_ids, block_logp, chosen = log_probabilities_(logits, top_n, next_ids[rows])
        top_ids[rows], top_logp[rows], token_logprobs[start + 1: rows.stop + 1] = block_ids.cpu(), block_logp.cpu(), chosen.cpu()
    token_logprobs = token_logprobs[:T]
    lens_ids, lens_probs = logit_lens(model, resid, top_n)
    half = lambda t: t.float().cpu().numpy().astype(np.float16)  # noqa: E731
    return Trace(
        tokens=np.array(ids, dtype=np.int64),
        token_strings=token_strings(tokenizer, ids),
        attention_packed=packed,
        resid=half(resid),
        embed=half(store["embed"]),
        pos_embed=half(store["pos_embed"]),
        top_ids=top_ids.numpy().astype(np.int32),
        top_probs=top_logp.exp().numpy().astype(np.float32),
        logprobs=token_logprobs.numpy().astype(np.float32),
        lens_ids=lens_ids.cpu().numpy().astype(np.int32),
        lens_probs=half(lens_probs),
    )

