"""Coupled counterfactual generation (gpt2viz/compare.py): same draw u at every step, and what it reports,
against independent computations (transformers' logits, numpy's KL, the draw recomputed by hand)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt2viz import SamplingConfig, load_model
from gpt2viz.compare import CoupledSession, compare
from gpt2viz.interventions import AblateHeads, AblateMLP, ScaleHead
from gpt2viz.roles import ROLE_THRESHOLD, distinct_tokens, head_scores, repeated_random_tokens
from gpt2viz.sampling import step_generator
from test_interventions import by_hand, hf_logits

PROMPT = "The old lighthouse keeper climbed the stairs"


@pytest.fixture(scope="module")
def small(hf_checkpoints, tokenizer):
    hf, folder = hf_checkpoints["small"]
    return hf, load_model(folder), tokenizer


@pytest.mark.parametrize("config", [SamplingConfig(seed=4, max_new_tokens=25), SamplingConfig(seed=9, temperature=0.8, top_k=40,
                                                                                            top_p=0.9, repetition_penalty=1.3, max_new_tokens=25)])
def test_without_interventions_both_runs_are_the_same_bit_for_bit(small, config):
    _, model, tok = small
    r = compare(model, tok, PROMPT, config, [])
    assert r.original_ids == r.intervened_ids and r.original_text == r.intervened_text
    assert r.first_divergence is None and not r.diverged
    assert len(r.kl) == len(r.tv) == 25
    assert (r.kl == 0).all() and (r.tv == 0).all() and (r.kl_model == 0).all()
    np.testing.assert_array_equal(r.logprob_original, r.logprob_intervened)
    assert r.loss_change == 0


def test_same_seed_and_interventions_reproduce_bit_for_bit(small):
    _, model, tok = small
    config, ivs = SamplingConfig(seed=2, max_new_tokens=20), [AblateHeads(layer=1, heads=(1, 3)), AblateMLP(layer=0, mode="mean")]
    a, b = compare(model, tok, PROMPT, config, ivs), compare(model, tok, PROMPT, config, ivs)
    assert a.original_ids == b.original_ids and a.intervened_ids == b.intervened_ids
    for field in ("kl", "tv", "kl_model", "logprob_original", "logprob_intervened"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.first_divergence == b.first_divergence is not None  # random weights: an ablation changes the text


def test_both_runs_draw_each_token_with_the_same_u_by_inverse_cdf(small):
    """Recomputed by hand from transformers' logits on each run's own text: the token of every step is the
    first whose cumulative probability exceeds u, with u from the (seed, position) stream in both runs."""
    hf, model, tok = small
    ivs = [ScaleHead(layer=2, head=0, factor=3.0)]
    config = SamplingConfig(seed=11, temperature=1.2, max_new_tokens=20)
    session = CoupledSession(model, tok, PROMPT, config, ivs)
    list(session.run())
    n_prompt = len(session.original.prompt_ids)
    edits = [e for iv in ivs for e in by_hand(hf, tok, iv, model.cfg.d_head)]
    for run, run_edits in ((session.original, []), (session.intervened, edits)):
        ids = run.ids
        logits = hf_logits(hf, ids, run_edits)
        for k, step in enumerate(run.steps):
            p = n_prompt - 1 + k
            u = float(torch.rand((), generator=step_generator(config.seed, p + 1), dtype=torch.float64))
            probs = torch.softmax(logits[p].double() / 1.2, -1).numpy()
            cdf = np.cumsum(probs)
            assert cdf[step.token_id] - probs[step.token_id] <= u * cdf[-1] + 1e-6 and u * cdf[-1] <= cdf[step.token_id] + 1e-6
    report = session.report()
    assert report.first_divergence is not None
    o, i = session.original.steps, session.intervened.steps
    assert [s.token_id for s in o[: report.first_divergence]] == [s.token_id for s in i[: report.first_divergence]]
    assert o[report.first_divergence].token_id != i[report.first_divergence].token_id


def test_divergence_and_log_probabilities_equal_numpy_on_transformers_logits(small):
    hf, model, tok = small
    ivs = [AblateHeads(layer=0, heads=(0, 1, 2, 3))]
    config = SamplingConfig(seed=5, max_new_tokens=15)  # temperature 1, no filter: the final distribution is the softmax
    r = compare(model, tok, PROMPT, config, ivs)
    ids = r.original_ids
    edits = [e for iv in ivs for e in by_hand(hf, tok, iv, model.cfg.d_head)]
    lp_o = torch.log_softmax(hf_logits(hf, ids).double(), -1).numpy()
    lp_i = torch.log_softmax(hf_logits(hf, ids, edits).double(), -1).numpy()
    rows = range(r.prompt_length - 1, len(ids) - 1)
    kl = [float(np.sum(np.exp(lp_o[t]) * (lp_o[t] - lp_i[t]))) for t in rows]
    tv = [0.5 * float(np.abs(np.exp(lp_o[t]) - np.exp(lp_i[t])).sum()) for t in rows]
    np.testing.assert_allclose(r.kl, kl, atol=1e-4)
    np.testing.assert_allclose(r.kl_model, kl, atol=1e-4)
    np.testing.assert_allclose(r.tv, tv, atol=1e-5)
    assert max(kl) > 0.01
    by_hand_o = [lp_o[t - 1, ids[t]] for t in range(1, len(ids))]
    by_hand_i = [lp_i[t - 1, ids[t]] for t in range(1, len(ids))]
    np.testing.assert_allclose(r.logprob_original[1:], by_hand_o, atol=1e-4)
    np.testing.assert_allclose(r.logprob_intervened[1:], by_hand_i, atol=1e-4)
    prompt = range(0, r.prompt_length - 1)
    change = -np.mean([by_hand_i[t] for t in prompt]) + np.mean([by_hand_o[t] for t in prompt])
    assert r.loss_change == pytest.approx(change, abs=1e-4)


def test_filtered_final_distributions_report_an_infinite_kl_where_a_choice_becomes_impossible(small):
    _, model, tok = small
    r = compare(model, tok, PROMPT, SamplingConfig(seed=3, top_k=1, max_new_tokens=12), [AblateHeads(layer=2, heads=(0, 1, 2, 3))])
    changed = r.tv > 0  # greedy-like: where the two top tokens differ, TV is 1 and KL infinite
    assert changed.any()
    assert np.all(r.tv[changed] == 1) and np.all(np.isinf(r.kl[changed])) and np.all(r.kl[~changed] == 0)
    assert np.isfinite(r.kl_model).all()


def test_forcing_and_rewinding_work_in_compare_mode(small):
    _, model, tok = small
    ivs = [AblateHeads(layer=1, heads=(2,))]
    config = SamplingConfig(seed=8, max_new_tokens=12)
    force = {3: 318, 7: 11}
    session = CoupledSession(model, tok, PROMPT, config, ivs)
    first = [pair for pair in session.run(force=force)]
    for k, token in force.items():
        assert first[k][0].token_id == first[k][1].token_id == token
        assert first[k][0].method == first[k][1].method == "forced"
    session.rewind(5)
    assert len(session.original.steps) == len(session.intervened.steps) == 5
    list(session.run(max_new_tokens=7, force=force))
    again = session.report()
    fresh = compare(model, tok, PROMPT, config, ivs, force=force)
    assert again.original_ids == fresh.original_ids and again.intervened_ids == fresh.intervened_ids
    np.testing.assert_array_equal(again.kl, fresh.kl)


def test_knocking_out_the_toy_models_induction_heads_stops_the_copying(tokenizer):
    """The detector's induction heads of the bundled toy model, switched off: the loss on the second copy of a
    repeated random sequence rises from under 1 nat to several, the first copy (which nothing can predict) barely changes.
    A control: switching off the other layer-1 head changes neither."""
    model = load_model("toy-induction")
    scores = head_scores(model)
    induction = [(int(layer), int(head)) for layer, head in zip(*np.nonzero(scores.induction >= ROLE_THRESHOLD))]
    assert induction == [(1, 0), (1, 1)]
    L = 20
    for seed in range(3):
        ids = repeated_random_tokens(distinct_tokens(model), L, 1, seed)[0].tolist()
        plain = compare(model, tokenizer, ids, SamplingConfig(max_new_tokens=1), [])
        knocked = compare(model, tokenizer, ids, SamplingConfig(max_new_tokens=1), [AblateHeads(layer=1, heads=(0, 1))])
        control = compare(model, tokenizer, ids, SamplingConfig(max_new_tokens=1), [AblateHeads(layer=1, heads=(2,))])
        first, second = slice(1, L), slice(L + 1, 2 * L)
        loss = {name: (-np.mean(r.logprob_intervened[first]), -np.mean(r.logprob_intervened[second]))
                for name, r in (("plain", plain), ("knocked", knocked), ("control", control))}
        assert loss["plain"][1] < 1.0 and loss["knocked"][1] > loss["plain"][1] + 3.0
        assert abs(loss["knocked"][0] - loss["plain"][0]) < 0.3
        assert abs(loss["control"][1] - loss["plain"][1]) < 0.2 and abs(loss["control"][0] - loss["plain"][0]) < 0.3
