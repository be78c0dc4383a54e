"""The app's logic without the web: input checking, per-user sessions, and what each view shows."""

import json

import numpy as np
import torch
import pytest

from gpt2viz import GenerationSession, SamplingConfig, trace
from gpt2viz import controller as c
from gpt2viz.plots import show


class FakeModels:
    """A Models stand-in that serves the random test checkpoint (no Hub, no bundled model needed)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.default = model, tokenizer, "test"

    def get(self, name):
        if name != "test":
            raise c.UserError(f"unknown model {name!r}")
        return self.model


@pytest.fixture
def models(small_model, tokenizer):
    return FakeModels(small_model, tokenizer)


def test_sampling_config_from_ui_values():
    cfg = c.sampling_config(0.7, 40.0, 0.9, 1.2, 25.0, "7")
    assert (cfg.top_k, cfg.max_new_tokens, cfg.seed) == (40, 25, 7)
    for bad in [(-1, 0, 1, 1, 5, 0), (1, 0, 0, 1, 5, 0), (1, 0, 1, 0.5, 5, 0), (1, 0, 1, 1, 5, -3), (1, 2.5, 1, 1, 5, 0)]:
        with pytest.raises(c.UserError, match="Setting out of range"):
            c.sampling_config(*bad)


def test_prompt_checks(models):
    with pytest.raises(c.UserError, match="prompt is empty"):
        c.check_prompt(models, "test", "   ")
    with pytest.raises(c.UserError, match="prompt is empty"):
        c.check_prompt(models, "test", None)
    with pytest.raises(c.UserError, match="too long"):
        c.check_prompt(models, "test", "x" * (c.MAX_PROMPT_CHARS + 1))
    n_ctx = models.model.cfg.n_positions
    with pytest.raises(c.UserError, match=f"can only read {n_ctx} tokens"):
        c.check_prompt(models, "test", " the" * n_ctx)
    assert c.check_prompt(models, "test", "Hello world") == [15496, 995]


def test_forced_token_parsing(tokenizer):
    assert c.parse_forced_token(tokenizer, " Paris") == tokenizer.encode(" Paris")[0]
    assert c.parse_forced_token(tokenizer, "#464") == 464
    with pytest.raises(c.UserError, match="no token #50257"):
        c.parse_forced_token(tokenizer, "#50257")
    with pytest.raises(c.UserError, match="not a single token .* splits into 3 tokens"):
        c.parse_forced_token(tokenizer, " Parisian hello")
    with pytest.raises(c.UserError, match="Type a token"):
        c.parse_forced_token(tokenizer, "")


def test_window_contains_the_selection_and_respects_bounds():
    for n in (1, 5, 40, 41, 300):
        for size in (16, 40):
            for sel in range(n):
                start, end = c.window(sel, n, size)
                assert 0 <= start <= sel < end <= n
                assert end - start == min(n, size)


def test_sessions_are_isolated_bounded_and_rebuilt(models):
    store = c.Sessions(models, max_sessions=2)
    cfg = SamplingConfig(seed=3)
    key_a, a = store.create("test", [464, 2068], cfg)
    key_b, b = store.create("test", [15496], cfg)
    a.session.step()
    assert b.session.ids == [15496]  # one user's step never touches another's text
    state_a = c.sync_state({"key": key_a}, a)
    assert json.loads(json.dumps(state_a)) == state_a  # small, plain state
    store.create("test", [1, 2, 3], cfg)  # evicts the least recently used (a)
    assert len(store) == 2
    rebuilt = store.get(state_a, cfg)
    assert rebuilt is not a and rebuilt.session.ids == a.session.ids
    assert len(rebuilt.session.records) == len(rebuilt.session.ids) - 1
    store.drop(state_a["key"])
    assert len(store) == 2 - 1


def test_views_show_the_recorded_numbers(small_model, tokenizer):
    session = GenerationSession(small_model, tokenizer, "The quick brown fox jumps", SamplingConfig(seed=1), record=True)
    for _ in range(4):
        session.step()
    session.peek()
    tr = trace(small_model, tokenizer, session.ids)
    n = len(session.ids)
    assert len(session.records) == n

    strip = c.token_strip(session)
    assert [t for t, _ in strip] == [t.replace("\n", "↵") for t in tr.token_strings]
    assert strip[0][1] == "start"
    for i in range(1, n):  # prompt and generated tokens alike, by the probability the model gave them
        assert strip[i][1] == c.prob_category(float(tr.logprobs[i]))
    assert len({cat for _, cat in strip}) >= 2

    pos, layer, head = n - 2, 1, 3
    one, grid, row = c.attention_views(session, pos, layer, head)
    z = np.array(one.data[0].z, dtype=np.float32)
    start, end = c.window(pos, n, c.WINDOW_ATTENTION)
    _, cache = small_model.run_with_cache(torch.tensor([session.ids]), names=["pattern"])  # float32 patterns of the same text
    pattern = cache["pattern", layer][0].numpy()  # [head, query, key]
    expected = pattern[head, start:end, start:end]
    np.testing.assert_allclose(np.nan_to_num(z), expected, atol=6e-4)  # figures carry 3 decimals
    assert np.isnan(z[np.triu_indices(len(z), 1)]).all()  # nothing above the diagonal
    row_z = np.array(row.data[1].z, dtype=np.float32)
    np.testing.assert_allclose(row_z, pattern[:, pos, : pos + 1], atol=6e-4)
    np.testing.assert_allclose(np.array(row.data[0].y, dtype=np.float32), pattern[:, pos, : pos + 1].mean(0), atol=6e-4)
    assert len(grid.data) == small_model.cfg.n_head
    assert f"Layer {layer}, head {head}" in one.layout.title.text

    lens = c.logit_lens_view(session, pos)
    ls, le = c.window(pos, n, c.WINDOW_LENS)
    heat = lens.data[0]
    np.testing.assert_allclose(np.array(heat.z, dtype=np.float32), tr.lens_probs[:, ls:le, 0].T.astype(np.float32), atol=2e-3)
    expected_text = [[tokenizer.decode_single_token_bytes(int(t)).decode("utf-8", "replace") for t in tr.lens_ids[:, p, 0]] for p in range(ls, le)]
    assert [list(r) for r in heat.text] == [[show(t) for t in row] for row in expected_text]

    emb, norms, traj = c.embedding_views(session, pos)
    np.testing.assert_allclose(np.array(norms.data[0].y, dtype=np.float32), np.linalg.norm(tr.resid[:, pos].astype(np.float32), axis=-1), rtol=5e-3, atol=5e-3)
    np.testing.assert_allclose(np.array(emb.data[0].y, dtype=np.float32) + np.array(emb.data[1].y, dtype=np.float32), tr.resid[0, pos].astype(np.float32), atol=3e-3)
    assert len(traj.data[0].x) == small_model.cfg.n_layer + 1


def test_next_token_view_marks_the_chosen_token(small_model, tokenizer):
    session = GenerationSession(small_model, tokenizer, "Hello", SamplingConfig(seed=2, top_k=5), record=True)
    step = session.step()
    fig = c.next_token_view(step)
    names = list(fig.data[0].y)
    marked = [i for i, name in enumerate(names) if name.startswith("▶")]
    assert len(marked) == 1
    cand = step.candidates[marked[0]]
    assert cand.token_id == step.token_id
    assert float(fig.data[1].x[marked[0]]) == pytest.approx(step.prob_final, abs=1e-4)
    assert float(fig.data[0].x[marked[0]]) == pytest.approx(step.prob, abs=1e-4)
    choices = c.candidate_choices(session)
    assert len(choices) >= 10 and all(isinstance(v, int) for _, v in choices)


def test_sessions_stay_within_a_memory_budget(models):
    cfg = SamplingConfig(seed=1)
    probe_key, probe = c.Sessions(models).create("test", [464, 2068, 318], cfg)
    probe.session.peek()
    one = probe.session.nbytes
    assert one > 0
    store = c.Sessions(models, max_sessions=100, max_bytes=int(2.5 * one))
    keys = []
    for _ in range(5):
        key, entry = store.create("test", [464, 2068, 318], cfg)
        entry.session.peek()  # memory grows when the session reads its text
        keys.append(key)
    store.get({"key": keys[-1]}, cfg)  # the next request enforces the budget
    assert len(store) == 2 and store.nbytes <= store.max_bytes
    # The newest survive; an evicted user's text is rebuilt from their state when they come back.
    rebuilt = store.get({"key": keys[0], "model": "test", "prompt_len": 3, "ids": [464, 2068, 318]}, cfg)
    assert rebuilt.session.ids == [464, 2068, 318] and store.nbytes <= store.max_bytes
