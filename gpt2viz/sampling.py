"""The sampling pipeline, stage by stage, so that a UI can show how each control reshapes the distribution.

Order (as in Hugging Face `generate`): repetition penalty -> temperature -> top-k -> top-p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it. Range [0, 100].
    top_k: keep the k most likely tokens (and any tied with the k-th); 0 turns it off.
    top_p: keep the smallest set of most likely tokens whose probability reaches p; range (0, 1].
    repetition_penalty: CTRL rule, >= 1: a token already in the text has its logit divided by
        the penalty when positive and multiplied by it when negative.
    max_new_tokens: how many tokens to generate at most, >= 1.
    seed: makes sampling reproducible, >= 0.
    stop_at_eos: stop after `<|endoftext|>`.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 50
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        _number(self, "temperature", 0.0, 100.0, "[0, 100] (0 = greedy)")
        _integer(self, "top_k", 0, None, "an integer >= 0 (0 = off)")
        _number(self, "top_p", 0.0, 1.0, "(0, 1]", low_open=True)
        _number(self, "repetition_penalty", 1.0, 100.0, "[1, 100] (1 = off)")
        _integer(self, "max_new_tokens", 1, 100_000, "an integer in [1, 100000]")
        _integer(self, "seed", 0, 2**63 - 1, "an integer in [0, 2**63 - 1]")
        if not isinstance(self.stop_at_eos, bool):
            raise ValueError(f"stop_at_eos must be True or False, got {self.stop_at_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _number(cfg, name, low, high, allowed, low_open=False):
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in {allowed}, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        raise ValueError(f"{name} must be in {allowed}, got {value!r}")
    object.__setattr__(cfg, name, float(value))


def _integer(cfg, name, low, high, allowed):
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclass
class Distributions:
    """One position's next-token distribution at each stage, all `[vocab]` float32."""

    logits: torch.Tensor  # raw model output
    probs: torch.Tensor  # softmax(logits)
    probs_temperature: torch.Tensor  # softmax(logits / temperature), before penalty and filters
    probs_final: torch.Tensor  # what the token is drawn from


def apply_repetition_penalty(logits: torch.Tensor, previous: list[int] | torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL / Hugging Face rule on `[vocab]` logits: divide positive, multiply negative, once per token id."""
    if penalty == 1.0 or len(previous) == 0:
        return logits
    ids = torch.unique(torch.as_tensor(previous, dtype=torch.long))
    out = logits.clone()
    chosen = out[ids]
    out[ids] = torch.where(chosen < 0, chosen * penalty, chosen / penalty)
    return out


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean `[vocab]`: tokens kept by top-k (ties with the k-th value are kept). k=0 keeps all."""
    if k <= 0 or k >= logits.numel():
        return torch.ones_like(logits, dtype=torch.bool)
    kth = torch.topk(logits, k).values[-1]
    return logits >= kth


def top_p_mask(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean `[vocab]`: the smallest set of most likely tokens whose total probability reaches p.

    A token is kept when the mass of the tokens ranked before it is still below p, so the
    most likely token is always kept and p = 1 keeps every token.
    """
    if p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_probs, order = torch.sort(probs.double(), descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, 0) - sorted_probs
    keep_sorted = mass_before < p
    mask = torch.zeros_like(probs, dtype=torch.bool)
    mask[order[keep_sorted]] = True
    return mask


def distributions(logits: torch.Tensor, previous: list[int] | torch.Tensor, cfg: SamplingConfig,
                  probs: torch.Tensor | None = None) -> Distributions:
    """Run the pipeline on one position's raw logits `[vocab]`; `previous` are the ids so far. `probs`: their
    softmax if already computed (`distribution_rows` computes every row's in one call)."""
    logits = logits.float()
    probs = torch.softmax(logits, 0) if probs is None else probs
    penalized = apply_repetition_penalty(logits, previous, cfg.repetition_penalty)
    if cfg.greedy:
        probs_temperature = _one_hot(logits)
        final = _one_hot(penalized)
    elif cfg.temperature == 1 and penalized is logits and cfg.top_k == 0 and cfg.top_p >= 1:
        # Every stage is the identity: x / 1 is x and nothing is masked, so each softmax would be
        # bit for bit the one already computed (a third of a decode step's sampling time).
        probs_temperature = final = probs
    else:
        probs_temperature = probs if cfg.temperature == 1 else torch.softmax(logits / cfg.temperature, 0)
        scaled = penalized / cfg.temperature
        keep = top_k_mask(scaled, cfg.top_k)
        scaled = scaled.masked_fill(~keep, float("-inf"))
        keep &= top_p_mask(torch.softmax(scaled, 0), cfg.top_p)
        final = torch.softmax(scaled.masked_fill(~keep, float("-inf")), 0)
    return Distributions(logits, probs, probs_temperature, final)


def _one_hot(logits: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(logits)
    out[torch.argmax(logits)] = 1.0
    return out


def step_generator(seed: int, position: int) -> torch.Generator:
    """The random stream for drawing the token at `position`: depends only on (seed, position),
    so a run replays bit for bit after a rewind."""
    return torch.Generator().manual_seed((seed * 1_000_003 + position) % (2**63 - 1))


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Inverse-CDF draw from `[vocab]` probabilities with one uniform number."""
    return draw_with(probs, float(torch.rand((), generator=generator, dtype=torch.float64)))


def uniform(seed: int, position: int) -> float:
    """The uniform number in [0, 1) that `draw` uses for the token at `position` (what "the draw" is)."""
    return float(torch.rand((), generator=step_generator(seed, position), dtype=torch.float64))


def draw_with(probs: torch.Tensor, u: float) -> int:
    """The token whose slice of the cumulative distribution of `[vocab]` probabilities holds u: the first
    index whose cumulative mass exceeds u x total (never a zero-probability token)."""
    return draw_rows(probs[None], [u])[0]


def draw_rows(probs: torch.Tensor, us: Sequence[float]) -> list[int]:
    """`draw_with` for each row of `[rows, vocab]` probabilities with its own uniform number: one cumulative
    sum and one search for all rows (a row's cumulative sum is a serial scan: the same whatever the other rows)."""
    cdf = torch.cumsum(probs, -1, dtype=torch.float64)  # each term widened as it is added: no float64 copy first
    target = torch.tensor(list(us), dtype=torch.float64) * cdf[:, -1]
    return torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp_(max=probs.shape[-1] - 1).tolist()


def cdf_slice(probs: torch.Tensor, token: int) -> tuple[float, float]:
    """`[start, end)` of `token`'s slice of the cumulative distribution (normalised to total 1)."""
    cdf = torch.cumsum(probs, 0, dtype=torch.float64)
    total = float(cdf[-1])
    end = float(cdf[token]) / total
    return end - float(probs[token]) / total, end


@dataclass
class Stage:
    """The distribution after one stage of the pipeline (`[vocab]` float32) and what the stage did."""

    name: str  # "model", "repetition penalty", "temperature", "top-k", "top-p"
    probs: torch.Tensor
    removed: float  # probability mass the stage set to zero (filters), 0 for the reshaping stages
    active: bool  # whether the setting changes anything (penalty 1, temperature 1, top-k 0, top-p 1 do not)


def sampler_stages(logits: torch.Tensor, previous: list[int] | torch.Tensor, cfg: SamplingConfig) -> list[Stage]:
    """The pipeline of `distributions`, stage by stage: raw softmax, after the repetition penalty, after
    the temperature, after top-k, after top-p (renormalised: the last is what the token is drawn from;
    with temperature 0 it is the one-hot of the likeliest token after the penalty)."""
    logits = logits.float()
    out = [Stage("model", torch.softmax(logits, 0), 0.0, True)]
    penalized = apply_repetition_penalty(logits, previous, cfg.repetition_penalty)
    out.append(Stage("repetition penalty", torch.softmax(penalized, 0), 0.0, penalized is not logits))
    if cfg.greedy:
        out.append(Stage("temperature", _one_hot(penalized), 1.0 - float(torch.softmax(penalized, 0).max()), True))
        return out
    scaled = penalized / cfg.temperature
    before = torch.softmax(scaled, 0)
    out.append(Stage("temperature", before, 0.0, cfg.temperature != 1))
    keep = top_k_mask(scaled, cfg.top_k)
    after_k = torch.softmax(scaled.masked_fill(~keep, float("-inf")), 0)
    out.append(Stage("top-k", after_k, float(before[~keep].double().sum()), bool((~keep).any())))
    keep_p = keep & top_p_mask(after_k, cfg.top_p)
    final = torch.softmax(scaled.masked_fill(~keep_p, float("-inf")), 0)
    out.append(Stage("top-p", final, float(after_k[keep & ~keep_p].double().sum()), bool((keep & ~keep_p).any())))
    return out


def entropy(probs: torch.Tensor) -> float:
    """Shannon entropy in nats of `[vocab]` probabilities."""
    return entropies(probs[None])[0]


def entropies(probs: torch.Tensor, logits: torch.Tensor | None = None) -> list[float]:
    """`entropy` of each row of `[rows, vocab]` probabilities, -Σ p log p, the terms summed in float64. With `logits`
    (`[rows, vocab]`, whose softmax `probs` is), log p is their log-softmax, one call for every row; without, each
    row's log is taken in a call of its own. A session's figures must not depend on whom it is batched with, so
    nothing here mixes rows: the log-softmax and the products work row by row, a row's own log call sees only that
    row (torch's vectorised log takes its scalar path for some elements of a many-row tensor, depending on where
    the rows fall), and torch's float64 sum reduces each row whole on one thread once there are two rows or more
    (a lone row it would split between threads: it is summed beside a copy of itself)."""
    if logits is not None:
        logp = torch.log_softmax(logits.float(), -1)
    else:
        logp = torch.empty_like(probs)
        for i in range(len(probs)):
            torch.log(probs[i], out=logp[i])
    terms = logp.mul_(probs).nan_to_num_(0.0)  # 0 log 0 = 0: the NaN of 0 x -inf
    both = terms if len(terms) > 1 else terms.expand(2, -1)
    return [0.0 - h for h in both.sum(-1, dtype=torch.float64)[:len(terms)].tolist()]


def row_entropies(rows: "DistributionRows") -> tuple[list[float], list[float]]:
    """The entropy of each row's model distribution and of its final one (the same number where the settings
    leave the model's distribution as it is)."""
    raw = entropies(rows.probs, rows.logits)
    final = list(raw)
    if rows.final_changed:
        for i, h in zip(rows.final_changed, entropies(rows.probs_final[list(rows.final_changed)])):
            final[i] = h
    return raw, final


def rank_of(probs: torch.Tensor, token: int) -> int:
    """1-based rank of `token` (1 = most likely); tokens of equal probability share the better rank."""
    return ranks(probs[None], [token])[0]


def ranks(probs: torch.Tensor, tokens: Sequence[int]) -> list[int]:
    """`rank_of` each row's token in `[rows, vocab]` probabilities."""
    at = probs.gather(1, torch.tensor(list(tokens), dtype=torch.long)[:, None])
    return ((probs > at).sum(-1) + 1).tolist()


@dataclass
class DistributionRows:
    """`Distributions` of several positions (each with its own settings and text), every stage `[rows, vocab]`
    float32: what the engine's batch of sessions choose their tokens from, a few calls for all of them."""

    logits: torch.Tensor
    probs: torch.Tensor
    probs_temperature: torch.Tensor
    probs_final: torch.Tensor
    final_changed: tuple[int, ...] = ()  # the rows whose final distribution is not the model's (their settings change it)


def distribution_rows(logits: torch.Tensor, previous: Sequence[list[int] | torch.Tensor],
                      configs: Sequence[SamplingConfig]) -> DistributionRows:
    """`distributions` of each row of `[rows, vocab]` logits with its own previous ids and settings: one softmax
    for every row's model distribution (a row's softmax is the same whatever the other rows), the other stages
    by `distributions` for the rows whose settings change them."""
    logits = logits.float()
    probs = torch.softmax(logits, -1)
    rows = [distributions(logits[i], previous[i], cfg, probs=probs[i]) for i, cfg in enumerate(configs)]
    stages = [probs, probs]
    for k, name in enumerate(("probs_temperature", "probs_final")):
        changed = [i for i, d in enumerate(rows) if getattr(d, name) is not d.probs]
        if changed:
            stages[k] = probs.clone()
            for i in changed:
                stages[k][i] = getattr(rows[i], name)
    return DistributionRows(logits, probs, *stages, final_changed=tuple(i for i, d in enumerate(rows) if d.probs_final is not d.probs))
