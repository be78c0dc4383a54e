"""What gpt2viz captures from a forward pass, and the logit lens that reads it.

Shared by step-wise generation (one new position per step) and whole-text traces, so that
both show the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from .model import GPT2

ATTENTION_LEVELS = 255  # uint8 code q stands for probability q / 255


def quantize_attention(pattern: torch.Tensor) -> torch.Tensor:
    """Probabilities in [0, 1] (any shape) -> uint8 codes round(p * 255)."""
    return torch.round(pattern * ATTENTION_LEVELS).to(torch.uint8)


def dequantize_attention(codes: np.ndarray) -> np.ndarray:
    """uint8 codes -> float32 probabilities (within 1/510 of the originals)."""
    return codes.astype(np.float32) * np.float32(1 / ATTENTION_LEVELS)


def capture_hooks(
    model: GPT2, store: dict, rows: slice | None = None, pack: bool = False, attention_dtype: torch.dtype = torch.float16,
    patterns: bool = True,
) -> list:
    """Hooks that save, for the positions in `rows` (all if None), batch item 0 of:

    each layer's attention pattern `[head, query, key]` as float16 (with `pack`, only its causal
    half, `[head, T*(T+1)/2]`, row by row; `attention_dtype=torch.uint8` stores the 8-bit codes
    of `quantize_attention`), the residual stream after the embeddings and after
    each block `[pos, d_model]`, and the token and position embeddings `[pos, d_model]`.
    `patterns=False` leaves the attention to the fast fused kernel (see `attention_from_keys`).
    Patterns are reduced as each layer computes them, so only one layer's float32 pattern
    exists at a time.
    """
    rows = rows if rows is not None else slice(None)
    reduce = quantize_attention if attention_dtype == torch.uint8 else (lambda x: x.to(attention_dtype))
    causal: list[torch.Tensor] = []  # the lower-triangle indices, computed once for all layers

    def save_pattern(x, hook):
        if pack:
            if not causal:
                causal.extend(torch.tril_indices(x.shape[-1], x.shape[-1], device=x.device))
            store[hook.name] = reduce(x[0][:, causal[0], causal[1]])
        else:
            store[hook.name] = reduce(x[0, :, rows])

    def save_resid(x, hook):
        store[hook.name] = x[0, rows]

    hooks = [(("pattern", i), save_pattern) for i in range(model.cfg.n_layer)] if patterns else []
    hooks += [("blocks.0.resid_pre", save_resid), ("embed", save_resid), ("pos_embed", save_resid)]
    hooks += [(("resid_post", i), save_resid) for i in range(model.cfg.n_layer)]
    return hooks


@torch.no_grad()
def attention_from_keys(model: GPT2, layer: int, resid_pre: torch.Tensor, keys: torch.Tensor, start: int) -> torch.Tensor:
    """One layer's attention for the queries at positions start..start+n-1, recomputed exactly as the
    forward pass computes it: softmax(q k^T / sqrt(d_head)) over keys 0..position.

    resid_pre `[n, d_model]`: the residual stream entering the layer at those positions; keys
    `[head, >= start + n, d_head]`: the layer's cached keys. Returns `[head, n, start + n]`
    (zero above the causal diagonal). Nothing of the pattern has to be stored: the keys are in
    the KV cache anyway, and the residual stream is captured.
    """
    block = model.blocks[layer]
    return block.attn.pattern_from_keys(block.ln_1(resid_pre), keys[:, : start + resid_pre.shape[0]])


def stacked_captures(model: GPT2, store: dict, with_attention: bool = True) -> tuple:
    """From a filled store: attention `[layer, head, query, key]` (None without `with_attention`)
    and residual `[layer + 1, pos, d_model]`."""
    n = model.cfg.n_layer
    attention = torch.stack([store[f"blocks.{i}.attn.pattern"] for i in range(n)]) if with_attention else None
    resid = torch.stack([store["blocks.0.resid_pre"]] + [store[f"blocks.{i}.resid_post"] for i in range(n)])
    return attention, resid


@torch.no_grad()
def read_position(model: GPT2, resid: torch.Tensor, final_normed: torch.Tensor, top_n: int):
    """One position's next-token logits and its logit lens, with a single pass over the unembedding.

    resid `[layer + 1, d_model]` (after the embeddings and each block), final_normed `[d_model]`
    (the model's own final layer norm output). Returns logits `[vocab]` (exactly the model's
    output row), lens ids `[layer + 1, top_n]` and lens probabilities `[layer + 1, top_n]`.
    """
    normed = torch.cat([model.ln_f(resid[:-1]), final_normed[None]])
    logits = model.unembed(normed).float()  # [layer + 1, vocab]; the last row is the model's output
    output = logits[-1].clone()
    ids, probs = top_probabilities_(logits, top_n)
    return output, ids, probs


def logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise log-sum-exp of `[rows, vocab]` logits -> `[rows]`, computed in place: `logits` is overwritten.

    Nothing the size of the block is allocated. Fresh multi-MB temporaries per block (what
    torch.log_softmax and torch.logsumexp return or use) fragment glibc's heap when small
    results are kept between them: reading the lens of a 1024-token gpt2-medium text grew the
    process by 5 GB that way.
    """
    peak = logits.amax(dim=-1, keepdim=True)
    return (peak + logits.sub_(peak).exp_().sum(dim=-1, keepdim=True).log_())[:, 0]


def log_probabilities_(logits: torch.Tensor, top_n: int, targets: torch.Tensor | None = None):
    """One reduction of a block of logits `[rows, vocab]` (overwritten, see `logsumexp_`): the top-n
    ids `[rows, top_n]` and their log-probabilities (both None for top_n=0: a top-k pass costs as
    much as the log-sum-exp), and the log-probability of `targets` `[rows]` (None without targets)."""
    top_logits, top_ids = torch.topk(logits, top_n, dim=-1) if top_n else (None, None)
    chosen = logits.gather(1, targets[:, None])[:, 0] if targets is not None else None
    lse = logsumexp_(logits)
    return (top_ids, None if top_logits is None else top_logits - lse[:, None],
            None if chosen is None else chosen - lse)


def top_probabilities_(logits: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits `[rows, vocab]` -> the top-n ids `[rows, top_n]` and their softmax probabilities
    (`logits` is overwritten, see `logsumexp_`)."""
    ids, logp, _ = log_probabilities_(logits, top_n)
    return ids, logp.exp_()


@torch.no_grad()
def unembedded_blocks(model: GPT2, normed: torch.Tensor, chunk: int = 128, block: int = 32):
    """Yield `(start, logits)` for final-layer-normed rows `[n, d_model]`, `logits` `[<= block, vocab]`
    float32 for rows start..start+block-1.

    One GEMM per `chunk` rows into one reused buffer, handed out a cache-sized block at a time:
    on this kind of CPU a softmax over 32 rows of 50k logits runs about 3x faster than over 256
    (the rows stay in cache), and the reused buffer spares a fresh page-faulted result per chunk
    (128 rows of gpt2 logits, 26 MB, also stay under glibc's 32 MB limit for memory it recycles).
    A block is only valid until the next one is yielded, and may be overwritten (`logsumexp_`).
    """
    n = normed.shape[0]
    buf = torch.empty(min(chunk, n), model.cfg.vocab_size, dtype=normed.dtype, device=normed.device)
    for c in range(0, n, chunk):
        rows = normed[c:c + chunk]
        logits = model.unembed(rows, out=buf[: rows.shape[0]])
        for b in range(0, rows.shape[0], block):
            yield c + b, logits[b:b + block].float()


@torch.no_grad()
def next_token_logprobs(model: GPT2, normed: torch.Tensor, next_ids: list[int]) -> list[float]:
    """log p(next_ids[i] | position i) from final-layer-normed rows `[n, d_model]` (128 rows at a time
    through the packed unembedding, `GPT2.unembed_rows`, whose numbers for a row do not depend on the
    rows beside it: a prompt read in chunks, or beside other prompts, gets the same numbers as one read
    whole and alone)."""
    targets = torch.tensor(next_ids, device=normed.device)
    out: list[float] = []
    for start in range(0, normed.shape[0], 128):
        logits = model.unembed_rows(normed[start:start + 128]).float()
        out += log_probabilities_(logits, 0, targets[start:start + logits.shape[0]])[2].tolist()
    return out


@torch.no_grad()
def logit_lens(model: GPT2, resid: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read residual vectors `[..., d_model]` through the final layer norm and the unembedding.

    Returns the top-n token ids `[..., top_n]` (int64) and their probabilities `[..., top_n]`.
    Read from the last block's output this is exactly the model's next-token distribution.
    """
    lead = resid.shape[:-1]
    flat = model.ln_f(resid.reshape(-1, resid.shape[-1]))
    ids, probs = [], []
    for _, logits in unembedded_blocks(model, flat):
        top_ids, top_probs = top_probabilities_(logits, top_n)
        ids.append(top_ids)
        probs.append(top_probs)
    return torch.cat(ids).reshape(*lead, top_n), torch.cat(probs).reshape(*lead, top_n)
