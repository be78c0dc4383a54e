"""The sampling pipeline on hand-built logits: every control at its boundaries."""

import math

import numpy as np
import pytest
import torch

from gpt2viz import SamplingConfig
from gpt2viz.sampling import (
    apply_repetition_penalty,
    distributions,
    draw,
    entropy,
    rank_of,
    step_generator,
    top_k_mask,
    top_p_mask,
)


def probs_of(logits):
    return torch.softmax(torch.tensor(logits, dtype=torch.float32), 0)


def test_temperature_scales_logits():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    d = distributions(logits, [], SamplingConfig(temperature=0.5))
    expected = torch.exp(logits / 0.5) / torch.exp(logits / 0.5).sum()
    torch.testing.assert_close(d.probs_temperature, expected)
    torch.testing.assert_close(d.probs_final, expected)
    torch.testing.assert_close(d.probs, torch.exp(logits) / torch.exp(logits).sum())
    hot = distributions(logits, [], SamplingConfig(temperature=2.0))
    assert hot.probs_final[0] < d.probs_final[0]  # higher temperature flattens


def test_greedy_is_one_hot_on_the_penalized_argmax():
    logits = torch.tensor([3.0, 2.9, 0.0])
    d = distributions(logits, [0], SamplingConfig(temperature=0, repetition_penalty=1.2))
    # 3.0 / 1.2 = 2.5 < 2.9: the penalty moves the argmax to token 1
    assert d.probs_final.tolist() == [0.0, 1.0, 0.0]
    assert d.probs_temperature.tolist() == [1.0, 0.0, 0.0]


def test_top_k_keeps_ties_at_the_kth_value():
    logits = torch.tensor([5.0, 4.0, 3.0, 3.0, 1.0])
    assert top_k_mask(logits, 1).tolist() == [True, False, False, False, False]
    assert top_k_mask(logits, 3).tolist() == [True, True, True, True, False]  # tie at k-th kept
    assert top_k_mask(logits, 0).all() and top_k_mask(logits, 5).all() and top_k_mask(logits, 99).all()
    d = distributions(logits, [], SamplingConfig(top_k=2))
    kept = torch.exp(logits[:2]) / torch.exp(logits[:2]).sum()
    torch.testing.assert_close(d.probs_final, torch.cat([kept, torch.zeros(3)]))


def test_top_p_boundaries():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    assert top_p_mask(probs, 0.75).tolist() == [True, True, False, False]  # p reached exactly: stop
    assert top_p_mask(probs, 0.7500001).tolist() == [True, True, True, False]
    assert top_p_mask(probs, 0.5).tolist() == [True, False, False, False]
    assert top_p_mask(probs, 0.01).tolist() == [True, False, False, False]  # the top token always stays
    assert top_p_mask(probs, 1.0).all()
    tiny = torch.tensor([1 - 3e-8, 1e-8, 1e-8, 1e-8])
    assert top_p_mask(tiny, 1.0).all()  # p = 1 keeps even vanishing tokens


def test_top_p_after_top_k_renormalises():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    d = distributions(logits, [], SamplingConfig(top_k=3, top_p=0.7))
    # after top-k: [4/9, 3/9, 2/9, 0]; smallest set reaching 0.7: first two (7/9)
    torch.testing.assert_close(d.probs_final, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))


def test_repetition_penalty_on_positive_and_negative_logits():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, -1.0]
    assert apply_repetition_penalty(logits, [0], 1.0).tolist() == logits.tolist()
    d = distributions(logits, [0, 1], SamplingConfig(repetition_penalty=2.0))
    torch.testing.assert_close(d.probs_final, torch.softmax(torch.tensor([1.0, -4.0, 1.0, -1.0]), 0))
    torch.testing.assert_close(d.probs_temperature, torch.softmax(logits, 0))  # before the penalty


def test_entropy_and_rank():
    assert entropy(torch.tensor([0.5, 0.5, 0.0])) == pytest.approx(math.log(2))
    assert entropy(torch.tensor([1.0, 0.0])) == 0
    assert math.copysign(1, entropy(torch.tensor([1.0, 0.0]))) == 1  # not shown as -0.00
    p = torch.tensor([0.1, 0.6, 0.3, 0.0])
    assert [rank_of(p, i) for i in range(4)] == [3, 1, 2, 4]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(repetition_penalty=0.9), "repetition_penalty"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=None), "max_new_tokens"),
        (dict(seed=-1), "seed"),
        (dict(seed="1"), "seed"),
        (dict(stop_at_eos=1), "stop_at_eos"),
    ],
)
def test_invalid_configs_name_the_field_and_range(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        SamplingConfig(**kwargs)


def test_sampled_frequencies_match_the_final_distribution():
    """Chi-square goodness of fit, 6 categories (5 degrees of freedom), significance 0.001."""
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, -3.0, -9.0, 2.0])
    d = distributions(logits, [], SamplingConfig(temperature=1.3, top_k=6))
    n = 20000
    counts = torch.zeros(8)
    for position in range(n):
        counts[draw(d.probs_final, step_generator(1234, position))] += 1
    expected = d.probs_final.double() * n
    assert counts[expected == 0].sum() == 0  # filtered tokens are never drawn
    mask = expected > 0
    assert int(mask.sum()) == 6
    chi2 = float((((counts.double()[mask] - expected[mask]) ** 2) / expected[mask]).sum())
    CRITICAL_CHI2_DF5_P001 = 20.515  # from chi-square tables
    assert chi2 < CRITICAL_CHI2_DF5_P001


def test_draw_never_returns_zero_probability_tokens():
    probs = torch.tensor([0.0, 0.3, 0.0, 0.7, 0.0])
    seen = {draw(probs, step_generator(7, i)) for i in range(500)}
    assert seen == {1, 3}


@pytest.mark.parametrize("cfg", [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=5, top_p=0.8, repetition_penalty=1.4),
                                 SamplingConfig(temperature=1.5, top_p=0.5), SamplingConfig(temperature=0, repetition_penalty=2.0),
                                 SamplingConfig(top_k=3)])
def test_the_stages_end_in_the_distribution_tokens_are_drawn_from_and_say_what_each_removed(cfg):
    from gpt2viz.sampling import sampler_stages

    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -4.0])
    previous = [0, 3]
    st = sampler_stages(logits, previous, cfg)
    assert torch.equal(st[-1].probs, distributions(logits, previous, cfg).probs_final)
    assert [s.name for s in st][:2] == ["model", "repetition penalty"]
    # by hand, in float64
    x = logits.double().numpy().copy()
    if cfg.repetition_penalty != 1:
        for i in set(previous):
            x[i] = x[i] / cfg.repetition_penalty if x[i] > 0 else x[i] * cfg.repetition_penalty
    assert st[1].active == (cfg.repetition_penalty != 1)
    if cfg.greedy:
        return
    x = x / cfg.temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    np.testing.assert_allclose(st[2].probs.numpy(), p, atol=1e-6)
    keep = np.ones(8, bool) if cfg.top_k == 0 else x >= np.sort(x)[::-1][cfg.top_k - 1]
    assert st[3].removed == pytest.approx(p[~keep].sum(), abs=1e-6)
    pk = np.where(keep, p, 0) / p[keep].sum()
    order = np.argsort(-pk, kind="stable")
    before = np.cumsum(pk[order]) - pk[order]
    keep_p = np.zeros(8, bool)
    keep_p[order[before < cfg.top_p]] = True
    keep_p &= keep
    assert st[4].removed == pytest.approx(pk[keep & ~keep_p].sum(), abs=1e-6)


def test_the_draw_is_one_uniform_number_and_its_slice_of_the_cumulative_distribution():
    from gpt2viz.sampling import cdf_slice, draw_with, sampler_stages, uniform

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    probs = distributions(logits, [], SamplingConfig()).probs_final
    for position in range(200):
        u = uniform(7, position)
        token = draw(probs, step_generator(7, position))
        assert draw_with(probs, u) == token
        low, high = cdf_slice(probs, token)
        assert low <= u < high + 1e-12
    # "what if": the same u under other settings, without running the model again
    u = uniform(7, 3)
    hot = sampler_stages(logits, [], SamplingConfig(temperature=2.0))[-1].probs
    greedy = sampler_stages(logits, [], SamplingConfig(temperature=0))[-1].probs
    assert draw_with(greedy, u) == int(torch.argmax(logits))
    low, high = cdf_slice(hot, draw_with(hot, u))
    assert low <= u < high


def test_entropies_from_probabilities_or_logits_are_those_of_an_independent_float64_computation():
    """Both ways (each row's log, or the log-softmax of the logits) against -sum p log p in float64 with numpy,
    on peaked, flat and truncated rows (probabilities of exactly 0: 0 log 0 = 0)."""
    from gpt2viz.sampling import distribution_rows, entropies, row_entropies

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 50257, generator=gen) * torch.tensor([[0.1], [1.0], [3.0], [10.0], [200.0]])
    configs = [SamplingConfig(), SamplingConfig(top_k=40), SamplingConfig(temperature=0), SamplingConfig(top_p=0.5),
               SamplingConfig(temperature=0.7)]
    rows = distribution_rows(logits, [[]] * 5, configs)

    def reference(probs):
        p = probs.double().numpy()
        return [float(-np.sum(np.where(r > 0, r * np.log(np.where(r > 0, r, 1)), 0.0))) for r in p]

    lp = torch.log_softmax(logits.double(), -1)
    exact = (-(lp.exp() * lp).sum(-1)).tolist()  # from the logits in float64 throughout
    np.testing.assert_allclose(entropies(rows.probs, rows.logits), exact, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(entropies(rows.probs), reference(rows.probs), rtol=1e-5, atol=1e-6)
    raw, final = row_entropies(rows)
    assert rows.final_changed == (1, 2, 3, 4) and final[0] == raw[0] and final[2] == 0.0
    np.testing.assert_allclose(final, reference(rows.probs_final), rtol=1e-5, atol=1e-6)
    assert final[1] < raw[1] and final[3] < raw[3] and final[4] < raw[4]  # truncated and sharpened distributions


@pytest.mark.parametrize("batch", [2, 7, 30])
def test_the_batched_sampler_gives_each_row_what_the_row_gets_alone(batch):
    """The engine's sampler works on every session's row at once: each row's figures must not depend on the
    rows beside it (torch's parallel sum does: it splits a row differently when other rows are there)."""
    from gpt2viz.sampling import distribution_rows, draw_rows, entropies, ranks, row_entropies

    gen = torch.Generator().manual_seed(batch)
    logits = torch.randn(batch, 50257, generator=gen) * 3
    us = torch.rand(batch, generator=gen, dtype=torch.float64).tolist()
    configs = [SamplingConfig(seed=i, temperature=[1.0, 0.7, 0][i % 3], top_k=[0, 40][i % 2]) for i in range(batch)]
    rows = distribution_rows(logits, [[1, 2, 3]] * batch, configs)
    tokens = draw_rows(rows.probs_final, us)
    for i in range(batch):
        alone = distribution_rows(logits[i:i + 1], [[1, 2, 3]], configs[i:i + 1])
        for stage in ("probs", "probs_temperature", "probs_final"):
            assert torch.equal(getattr(rows, stage)[i], getattr(alone, stage)[0])
        assert tokens[i] == draw_rows(alone.probs_final, us[i:i + 1])[0]
        assert entropies(rows.probs)[i] == entropies(alone.probs)[0]
        assert entropies(rows.probs, rows.logits)[i] == entropies(alone.probs, alone.logits)[0]
        assert [h[i] for h in row_entropies(rows)] == [h[0] for h in row_entropies(alone)]
        assert ranks(rows.probs, tokens)[i] == ranks(alone.probs, tokens[i:i + 1])[0]
        cdf = np.cumsum(alone.probs_final[0].double().numpy())  # the draw, independently
        assert tokens[i] == min(int(np.searchsorted(cdf, us[i] * cdf[-1], side="right")), 50256)
