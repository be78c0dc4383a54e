"""What each attention head does, measured: previous-token, duplicate-token and induction scores.

The standard method (Olsson et al. 2022; TransformerLens's `detect_head`): run the model on a
random sequence of L tokens repeated once, `[t_0 .. t_{L-1}, t_0 .. t_{L-1}]`, and average each
head's attention over the queries i in the second copy (positions L .. 2L-1):

    previous_token:  attention from i to i - 1
    duplicate_token: attention from i to i - L (the earlier occurrence of the same token)
    induction:       attention from i to i - L + 1 (the token after the earlier occurrence)

The random tokens are drawn uniformly from the tokens that have an embedding of their own: all of
GPT-2's; for a model trained on a smaller vocabulary (the bundled model shares one embedding row
among the tokens it never saw) only the ones it learned. A score is a mean attention weight, in
[0, 1]. Scores are measured once per model and cached.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from .model import GPT2

ROLE_NAMES = ("previous_token", "duplicate_token", "induction")
ROLE_THRESHOLD = 0.25  # a head "has" a role when its score is at least this (mean attention; chance is ~1/L)


@dataclass(frozen=True)
class HeadScores:
    """`[layer, head]` float32 score of every head for each role, and how they were measured."""

    previous_token: np.ndarray
    duplicate_token: np.ndarray
    induction: np.ndarray
    length: int  # L, the length of the random sequence (the text is 2L tokens)
    batch: int
    seed: int

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ROLE_NAMES}

    def best(self, role: str) -> tuple[int, int, float]:
        """`(layer, head, score)` of the head with the highest score for `role`."""
        if role not in ROLE_NAMES:
            raise ValueError(f"unknown head role {role!r}; expected one of {ROLE_NAMES}")
        scores = getattr(self, role)
        layer, head = np.unravel_index(int(np.argmax(scores)), scores.shape)
        return int(layer), int(head), float(scores[layer, head])


def repeated_random_tokens(vocab: torch.Tensor | int, length: int, batch: int, seed: int) -> torch.Tensor:
    """`[batch, 2 * length]`: token ids drawn uniformly from `vocab` (ids, or a vocabulary size), then the same ids again."""
    ids = torch.arange(vocab) if isinstance(vocab, int) else vocab
    gen = torch.Generator().manual_seed(seed)
    first = ids[torch.randint(0, len(ids), (batch, length), generator=gen)]
    return torch.cat([first, first], dim=1)


def distinct_tokens(model: GPT2) -> torch.Tensor:
    """The ids whose embedding row no other token shares `[n]`, ascending."""
    _, inverse, counts = torch.unique(model.wte.weight.detach().cpu(), dim=0, return_inverse=True, return_counts=True)
    return torch.nonzero(counts[inverse] == 1).flatten()


_CACHE: "weakref.WeakKeyDictionary[GPT2, dict]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def head_scores(model: GPT2, length: int | None = None, batch: int = 8, seed: int = 0) -> HeadScores:
    """Every head's role scores (see the module docstring); cached per model and arguments."""
    if length is None:
        length = min(50, (model.cfg.n_positions) // 2)
    if not 2 <= length <= model.cfg.n_positions // 2:
        raise ValueError(f"length must be in [2, {model.cfg.n_positions // 2}] for this model's context, got {length}")
    key = (length, batch, seed)
    per_model = _CACHE.setdefault(model, {})
    if key in per_model:
        return per_model[key]
    tokens = repeated_random_tokens(distinct_tokens(model), length, batch, seed).to(model.device)
    _, cache = model.run_with_cache(tokens, names=["pattern"])
    pattern = cache.stack("pattern").float()  # [layer, batch, head, query, key]
    queries = torch.arange(length, 2 * length, device=pattern.device)

    def score(offset: int) -> np.ndarray:
        picked = pattern[..., queries, queries - offset]  # [layer, batch, head, L]
        return picked.mean(dim=(1, 3)).cpu().numpy().astype(np.float32)

    result = HeadScores(score(1), score(length), score(length - 1), length, batch, seed)
    per_model[key] = result
    return result
