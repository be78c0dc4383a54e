"""The app's logic without the web: input checking, per-user sessions, the use cases and what each view shows.

Expected numbers come from `transformers` (the reference GPT-2) or from gpt2viz's `trace`, an
independent full forward pass, never from the view code under test.
"""

import json
import re

import numpy as np
import pytest
import torch

from gpt2viz import GenerationSession, SamplingConfig, load_model, trace
from gpt2viz import controller as c
from gpt2viz.plots import short, show

SETTINGS = [1.0, 0, 1.0, 1.0, 5, 0]  # temperature, top-k, top-p, penalty, max new tokens, seed


class FakeModels:
    """A Models stand-in that serves the random test checkpoints (no Hub, no bundled model needed)."""

    def __init__(self, models: dict, tokenizer):
        self.models, self.tokenizer, self.default = models, tokenizer, next(iter(models))
        self.notice = ""

    def names(self):
        return list(self.models)

    def get(self, name):
        if name not in self.models:
            raise c.UserError(f"unknown model {name!r}")
        return self.models[name]


@pytest.fixture(scope="module")
def two_models(hf_checkpoints):
    return {name: load_model(folder) for name, (_, folder) in hf_checkpoints.items()}  # small: 3x4, distil: 6x12


@pytest.fixture
def models(two_models, tokenizer):
    return FakeModels({"test": two_models["small"], "other": two_models["distil"]}, tokenizer)


@pytest.fixture
def ctl(models):
    return c.Controller(models, c.Sessions(models))


def test_sampling_config_from_ui_values():
    cfg = c.sampling_config(0.7, 40.0, 0.9, 1.2, 25.0, "7")
    assert (cfg.top_k, cfg.max_new_tokens, cfg.seed) == (40, 25, 7)
    for bad in [(-1, 0, 1, 1, 5, 0), (1, 0, 0, 1, 5, 0), (1, 0, 1, 0.5, 5, 0), (1, 0, 1, 1, 5, -3), (1, 2.5, 1, 1, 5, 0)]:
        with pytest.raises(c.UserError, match="Setting out of range"):
            c.sampling_config(*bad)


def test_prompt_checks(models):
    with pytest.raises(c.UserError, match="prompt is empty"):
        c.check_prompt(models, "test", "   ")
    with pytest.raises(c.UserError, match="can only read 64 tokens"):
        c.check_prompt(models, "test", " hello" * 80)
    assert c.check_prompt(models, "test", "Hello") == [15496]


def test_forced_token_parsing(tokenizer):
    assert c.parse_forced_token(tokenizer, " Paris") == (6342, "")
    assert c.parse_forced_token(tokenizer, "#464") == (464, "")
    token, hint = c.parse_forced_token(tokenizer, "love")
    assert token == tokenizer.encode("love")[0] and "' love'" in hint  # the likely meaning, with its space
    for bad, message in [("", "Type a token"), (" no such token", "not a single token"), ("#²", "not a token id"),
                         ("#" + "9" * 5000, "too long"), ("#" + "9" * 9, "not a token id"), ("#50257", "There is no token #50257"), ("x" * 300, "too long")]:
        with pytest.raises(c.UserError, match=message):
            c.parse_forced_token(tokenizer, bad)


@pytest.mark.parametrize("value, expected", [(3, 3), (3.0, 3), ("12", 12), (" 7 ", 7), (-1, None), (2.5, None),
                                             (float("nan"), None), ("²", None), ("1e3", None), (True, None), (None, None),
                                             ("9" * 5000, None)])
def test_indices_from_the_page_are_parsed_strictly(value, expected):
    assert c.as_index(value) == expected


def test_window_contains_the_selection_and_respects_bounds():
    for n in (1, 5, 40, 41, 300):
        for size in (10, 16):
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
    assert len(rebuilt.session.records) == len(rebuilt.session.ids)  # replayed on the engine, the last token read too
    store.drop(state_a["key"])
    assert len(store) == 2 - 1


def test_views_show_the_recorded_numbers(small_model, tokenizer):
    session = GenerationSession(small_model, tokenizer, "The quick brown fox jumps", SamplingConfig(seed=1), record=True)
    for _ in range(4):
        session.step()
    session.read()
    tr = trace(small_model, tokenizer, session.ids)
    n = len(session.ids)
    assert len(session.records) == n

    strip = c.token_strip(session, n - 2)["tokens"]
    assert [t["t"] for t in strip] == [show(t) for t in tr.token_strings]  # the same token display as the figures
    assert strip[0]["c"] == "first" and [t["sel"] for t in strip].count("sel") == 1 and strip[n - 2]["sel"] == "sel"
    for i in range(1, n):  # prompt and generated tokens alike, by the probability the model gave them
        assert strip[i]["c"] == c.prob_category(float(tr.logprobs[i]))
    # a stream's first message, sent before the prompt is scored (`read_together(later=...)`), says so
    unscored = c.strip_of(tokenizer, session.ids, [np.nan] * (n - 1) + [float(tr.logprobs[n - 1])], None)["tokens"]
    assert [t["c"] for t in unscored[:n - 1]] == ["first"] * (n - 1) and unscored[n - 1]["c"] == strip[n - 1]["c"]
    assert unscored[0]["p"] == "token 0: the first token" and all("not scored yet" in t["p"] for t in unscored[1:n - 1])

    pos, layer, head = n - 2, 1, 3
    one, grid, row = c.attention_views(session, pos, layer, head)
    z = np.array(one.data[0].z, dtype=np.float32)
    start, end = c.window(pos, n, c.WINDOW_ATTENTION)
    _, cache = small_model.run_with_cache(torch.tensor([session.ids]), names=["pattern"])  # float32 patterns of the same text
    pattern = cache["pattern", layer][0].numpy()  # [head, query, key]
    np.testing.assert_allclose(np.nan_to_num(z), pattern[head, start:end, start:end], atol=6e-4)  # figures carry 3 decimals
    assert np.isnan(z[np.triu_indices(len(z), 1)]).all()  # nothing above the diagonal
    assert len(one.data[0].x) == end - start == len(set(one.data[0].x))  # every token of the window labelled
    row_z = np.array(row.data[1].z, dtype=np.float32)
    rs = max(0, pos + 1 - c.WINDOW_ATTENTION)
    np.testing.assert_allclose(row_z, pattern[:, pos, rs: pos + 1], atol=6e-4)
    np.testing.assert_allclose(np.array(row.data[0].y, dtype=np.float32), pattern[:, pos, rs: pos + 1].mean(0), atol=6e-4)
    from gpt2viz.plots import grid_blocks

    big = np.array(grid.data[0].z, dtype=np.float32)  # every head in one heatmap, the same window as the single head's
    _, _, blocks = grid_blocks(small_model.cfg.n_head, end - start)
    for h, (r0, c0) in enumerate(blocks):
        block = big[r0:r0 + end - start, c0:c0 + end - start]
        np.testing.assert_allclose(np.nan_to_num(block), pattern[h, start:end, start:end], atol=6e-3)
    assert np.isnan(big).sum() == big.size - small_model.cfg.n_head * (end - start) * (end - start + 1) // 2  # nothing else drawn
    assert list(grid.layout.xaxis.ticktext[: end - start]) == list(one.data[0].x)  # every column labelled, as in the heatmap
    assert [a.text for a in grid.layout.annotations] == [f"head {h}" for h in range(small_model.cfg.n_head)]
    assert f"Layer {layer}, head {head}" in one.layout.title.text

    lens = c.logit_lens_view(session, pos)
    ls, le = c.window(pos, n, c.WINDOW_LENS)
    heat = lens.data[0]
    z = np.array(heat.z, dtype=np.float32)
    np.testing.assert_allclose(z[:, :-1], tr.lens_probs[:, ls:le, 0].T.astype(np.float32), atol=2e-3)
    assert np.isnan(z[:, -1]).all()  # the last column is the actual next token, uncoloured
    for w, p in enumerate(range(ls, le)):
        guesses = [tokenizer.decode_single_token_bytes(int(t)).decode("utf-8", "replace") for t in tr.lens_ids[:, p, 0]]
        actual = tokenizer.decode([session.ids[p + 1]]) if p + 1 < n else ""
        expected = [("✓" if actual and g == actual else "") + short(g, 6) for g in guesses]
        assert list(heat.text[w][:-1]) == expected
        assert heat.text[w][-1] == (short(actual, 6) if actual else "?")

    emb, norms, traj = c.embedding_views(session, pos)
    np.testing.assert_allclose(np.array(norms.data[0].y, dtype=np.float32), np.linalg.norm(tr.resid[:, pos].astype(np.float32), axis=-1), rtol=5e-3, atol=5e-3)
    np.testing.assert_allclose(np.array(emb.data[0].y, dtype=np.float32) + np.array(emb.data[1].y, dtype=np.float32), tr.resid[0, pos].astype(np.float32), atol=3e-3)
    assert len(traj.data[0].x) == small_model.cfg.n_layer + 1


def test_lens_marks_exactly_the_layers_that_get_the_next_token(small_model, tokenizer):
    # Force the text to continue with the model's own final guesses, so the last layer is right everywhere.
    session = GenerationSession(small_model, tokenizer, "The", SamplingConfig(temperature=0), record=True)
    for _ in range(6):
        session.step()
    session.read()
    tr = trace(small_model, tokenizer, session.ids)
    fig = c.logit_lens_view(session, len(session.ids) - 2)
    ls, le = c.window(len(session.ids) - 2, len(session.ids), c.WINDOW_LENS)
    for w, p in enumerate(range(ls, le)):
        nxt = session.ids[p + 1] if p + 1 < len(session.ids) else None
        marks = [cell.startswith("✓") for cell in fig.data[0].text[w][:-1]]
        assert marks == [nxt is not None and int(t) == nxt for t in tr.lens_ids[:, p, 0]]
        if nxt is not None and p >= 0:
            assert marks[-1]  # greedy text: the model's own top guess is what came next


def test_chosen_view_for_a_generated_and_a_prompt_token(hf_checkpoints, small_model, tokenizer):
    hf_model = hf_checkpoints["small"][0]
    session = GenerationSession(small_model, tokenizer, "Hello there my friend", SamplingConfig(seed=2, top_k=5), record=True)
    step = session.step()
    session.read()
    n_prompt = len(session.prompt_ids)
    fig = c.chosen_view(session, n_prompt)  # the generated token
    names = list(fig.data[0].y)
    marked = [i for i, name in enumerate(names) if name.startswith("▶")]
    assert len(marked) == 1 and step.candidates[marked[0]].token_id == step.token_id
    assert float(fig.data[1].x[marked[0]]) == pytest.approx(step.prob_final, abs=1e-4)
    assert float(fig.data[0].x[marked[0]]) == pytest.approx(step.prob, abs=1e-4)
    assert f"token {n_prompt}" in fig.layout.title.text

    # A prompt token: the model's own prediction there, against transformers, and the actual token's rank.
    p = 2
    with torch.no_grad():
        ref = torch.softmax(hf_model(torch.tensor([session.ids[:p]])).logits[0, -1].float(), -1)
    fig = c.chosen_view(session, p)
    assert len(fig.data) == 1  # nothing was sampled: no "after your settings" bars
    actual = session.ids[p]
    ranked = torch.argsort(ref, descending=True).tolist()
    rank = ranked.index(actual) + 1
    assert f"rank {rank}" in fig.layout.title.subtitle.text
    shown = list(fig.data[0].y)
    marked = [i for i, name in enumerate(shown) if name.startswith("▶")]
    assert len(marked) == 1
    np.testing.assert_allclose(np.array(fig.data[0].x[:10], dtype=np.float32), ref[ranked[:10]].numpy(), atol=2e-4)
    assert "first token" in c.chosen_view(session, 0).layout.annotations[0].text


def test_upcoming_follows_the_controls_without_adding_a_token(ctl):
    page = ctl.step(None, "test", "Hello there", SETTINGS, c.Selection())
    n = page.n_tokens
    hot = ctl.upcoming(page.state, [2.0] + SETTINGS[1:])
    cold = ctl.upcoming(page.state, [0.3] + SETTINGS[1:])
    assert hot.state["ids"] == cold.state["ids"] == page.state["ids"] and len(page.state["ids"]) == n
    top_hot = float(hot.upcoming.data[1].x[0])
    top_cold = float(cold.upcoming.data[1].x[0])
    assert top_cold > top_hot  # a lower temperature makes the likeliest token likelier
    assert list(hot.upcoming.data[0].x) == list(cold.upcoming.data[0].x)  # the model's own probabilities do not change
    assert "temperature 2" in hot.upcoming.layout.title.subtitle.text
    assert [v for _, v in hot.choices] and hot.choices[0][1] == int(hot.choices[0][1])


def test_one_selection_drives_every_view_and_is_clamped(ctl):
    page = ctl.step(None, "test", "Hello there my good friend", SETTINGS, c.Selection(position=2, layer=9, head=9))
    assert page.selection.position == page.n_tokens - 1  # a step selects the newest token
    assert (page.selection.layer, page.selection.head) == (2, 3)  # clamped to the 3-layer, 4-head model
    assert page.strip["selected"] == page.n_tokens - 1
    for tab in c.TABS:
        shown = ctl.select(page.state, SETTINGS, c.Selection(position=1, layer=1, head=2, tab=tab))
        assert shown.selection.position == 1 and shown.strip["selected"] == 1
        assert "token 1" in shown.selected_label
        assert set(shown.views) == {"chosen": {"chosen"}, "attention": {"attention", "row"}, "overview": {"grid", "overview"},
                                    "lens": {"lens", "lens_strip"}, "embed": {"embed", "norm", "traj"},
                                    "experiment": {"exp_strips", "exp_loss", "exp_bars"},
                                    "why": {"why_dla", "why_neurons", "why_sampler"}}[tab]  # only the visible tab
        if tab == "attention":
            assert "What token 1" in shown.views["row"].layout.title.text
            assert "Layer 1, head 2" in shown.views["attention"].layout.title.text
        if tab == "chosen":
            assert "token 1" in shown.views["chosen"].layout.title.text


def test_a_view_asked_for_before_there_is_a_text_leaves_the_page_as_it_is(ctl):
    """The browser selects the open tab when the page mounts, with the state it had then (none); that answer can
    land after a shared link's page has opened, and must not put the empty state or a message over it."""
    for state in (None, c.new_state("test")):
        for tab in c.TABS:
            page = ctl.select(state, SETTINGS, c.Selection(tab=tab))
            assert page.state is None and page.status is None and not page.views and page.strip is None
    kept = ctl.compare_with(c.new_state("test"), SETTINGS, c.Selection(), " friend")
    assert kept.state["versus"] is not None  # a word typed before the text is kept for it


def test_model_switch_brings_every_range_and_view_to_the_new_model(ctl):
    page = ctl.step(None, "test", "Hello there", SETTINGS, c.Selection(layer=2, head=3, tab="attention"))
    switched = ctl.switch_model(page.state, "other", "Hello there", SETTINGS, page.selection)
    assert switched.state["model"] == "other" and (switched.n_layer, switched.n_head) == (6, 12)
    assert switched.state["ids"] == c.check_prompt(ctl.models, "other", "Hello there")  # the prompt, read by the new model
    assert switched.selection.position == switched.n_tokens - 1 and (switched.selection.layer, switched.selection.head) == (0, 0)
    assert "Layer 0, head 0" in switched.views["attention"].layout.title.text
    grid = ctl.select(switched.state, SETTINGS, c.Selection(tab="overview"))
    assert "All 12 heads" in grid.views["grid"].layout.title.text
    assert switched.choices and switched.upcoming is not None
    back = ctl.force(switched.state, "other", "Hello there", SETTINGS, switched.selection, switched.choices[0][1])
    assert back.state["ids"][-1] == switched.choices[0][1] and back.state["model"] == "other"


def test_example_choice_opens_the_new_text(ctl):
    page = ctl.step(None, "test", "Hello there", SETTINGS, c.Selection())
    name = "Counting and patterns"
    chosen = ctl.choose_example(page.state, "test", name, SETTINGS, c.Selection())
    assert chosen.prompt == c.EXAMPLES[name].text and chosen.hint == c.EXAMPLES[name].hint
    assert chosen.state["ids"] == c.check_prompt(ctl.models, "test", chosen.prompt)
    assert chosen.strip["tokens"][-1]["t"] == show(ctl.models.tokenizer.decode([chosen.state["ids"][-1]]))


def test_induction_example_repeats_token_for_token(tokenizer):
    ids = tokenizer.encode(c.induction_text())
    half = len(ids) // 2
    assert len(ids) == 2 * c.INDUCTION_LENGTH and ids[:half] == ids[half:] and len(set(ids[:half])) == half


def test_show_me_refuses_a_lesson_the_model_cannot_show(ctl):
    page = ctl.choose_example(None, "test", "Induction heads: a repeated random sequence", SETTINGS, c.Selection(), show_me=True)
    assert page.warning and "has no clear induction head" in page.status and page.open_tab == "chosen"
    assert page.prompt == c.induction_text()  # the text is still there to look at


def test_a_full_context_stops_once_and_its_last_token_can_be_selected(ctl, tokenizer):
    prompt = tokenizer.decode(tokenizer.encode(" the" * 63))  # 63 of the model's 64 positions
    page = ctl.step(None, "test", prompt, SETTINGS, c.Selection())
    assert "filled the model's context" in page.status and "stopped: stopped" not in page.status.lower()
    assert page.n_tokens == 64 and page.selection.position == 63
    assert "token 63" in page.views["chosen"].layout.title.text
    assert "fills the model's context" in page.upcoming.layout.annotations[0].text and page.choices == []
    last = ctl.select(page.state, SETTINGS, c.Selection(position=63, tab="attention"))
    assert "What token 63" in last.views["row"].layout.title.text
    refused = ctl.step(page.state, "test", prompt, SETTINGS, c.Selection())
    assert refused.warning and "context" in refused.status


def test_errors_come_back_as_messages(ctl):
    for page in (ctl.step(None, "test", "", SETTINGS, c.Selection()),
                 ctl.force(None, "test", "Hi", SETTINGS, c.Selection(), "²"),
                 ctl.force(None, "test", "Hi", SETTINGS, c.Selection(), 10**9),
                 ctl.rewind(None, "test", "Hi", SETTINGS, c.Selection(), "nan"),
                 ctl.force_text(None, "test", "Hi", SETTINGS, c.Selection(), "#" + "1" * 5000),
                 ctl.step(None, "test", "Hi", [float("nan")] + SETTINGS[1:], c.Selection())):
        assert page.warning and page.status.startswith("⚠️ ") and page.status[3].isupper()
        assert "invalid literal" not in page.status and "Traceback" not in page.status


def test_teaching_texts_match_their_figures(small_model, tokenizer):
    import app

    session = GenerationSession(small_model, tokenizer, "The quick brown fox jumps over", SamplingConfig(seed=1), record=True)
    session.step()
    session.read()
    pos = len(session.ids) - 1
    attention = c.attention_views(session, pos, 0, 0)[0]
    lens = c.logit_lens_view(session, pos)
    for text, fig in ((app.TEXT_ATTENTION, attention), (app.TEXT_LENS, lens)):
        plain = re.sub(r"[*_]", "", text)
        row = re.search(r"each row is an? ([a-z ]+?)(?: \(| in|,|$)", plain, re.I)
        column = re.search(r"each column an? ([a-z ]+?)(?: \(| in|,|$)", plain, re.I)
        assert row and column, text
        y_title, x_title = fig.layout.yaxis.title.text, fig.layout.xaxis.title.text
        assert row.group(1).split()[-1] in y_title or row.group(1).split()[0] in y_title, (row.group(1), y_title)
        assert column.group(1).split()[-1] in x_title or column.group(1).split()[0] in x_title, (column.group(1), x_title)
    assert "query" in attention.layout.yaxis.title.text and "key" in attention.layout.xaxis.title.text
    assert "(the *query*)" in app.TEXT_ATTENTION and "(the *key*)" in app.TEXT_ATTENTION
    traj = c.embedding_views(session, pos)[2]
    assert "logit lens" in traj.layout.title.subtitle.text and "nearest" not in traj.layout.title.subtitle.text


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


def test_a_local_checkpoint_is_offered_by_its_folder_name_never_its_path(small_checkpoint, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    models = c.Models(default=str(small_checkpoint))
    assert models.default == f"local: {small_checkpoint.name}"
    assert all("/" not in name for name in models.names())
    assert set(models.names()) >= {models.default, "tiny-shakespeare"}


def test_lens_layers_keep_the_first_and_last_and_fit():
    assert c.lens_layers(12, 13) == list(range(13))  # gpt2: every layer
    rows = c.lens_layers(24, 13)  # gpt2-medium: every other layer, the embeddings and the last always
    assert rows[0] == 0 and rows[-1] == 24 and len(rows) == 13 and rows == sorted(set(rows))
    assert c.lens_layers(48, 13)[-1] == 48 and len(c.lens_layers(4, 5)) == 5


def test_show_me_for_agreement_opens_the_head_that_reads_the_subject(ctl, hf_checkpoints, tokenizer):
    hf_model = hf_checkpoints["small"][0]
    name = "Grammar: agreement"
    page = ctl.choose_example(None, "test", name, SETTINGS, c.Selection(), show_me=True)
    ids = tokenizer.encode(c.EXAMPLES[name].text)
    keys = ids.index(tokenizer.encode(" keys")[0])
    with torch.no_grad():
        att = torch.stack(hf_model(torch.tensor([ids]), output_attentions=True).attentions)[:, 0, :, -1, keys]  # [layer, head]
    best = float(att.max())
    layer, head = divmod(int(att.argmax()), att.shape[1])
    if best >= 0.25:
        assert (page.selection.layer, page.selection.head) == (layer, head) and page.open_tab == "attention"
        assert f"Layer {layer}, head {head} sends {best:.0%}" in page.status
    else:
        assert page.warning and f"the most is {best:.0%}" in page.status and page.open_tab == "chosen"


def test_experiment_targets_are_parsed_strictly():
    from gpt2viz import GPT2Config
    from gpt2viz.experiments import TargetError, parse_targets, target_choices
    from gpt2viz.interventions import AblateAttn, AblateHeads, AblateMLP

    cfg = GPT2Config(n_layer=2, n_head=3, n_embd=48)
    assert len(target_choices(cfg)) == 2 * 3 + 2 + 2
    assert parse_targets(["head 1.2", "MLP 0", "head 1.0", "attention 1", "head 1.2"], "mean", cfg) == [
        AblateHeads(layer=1, heads=(0, 2), mode="mean"), AblateMLP(layer=0, mode="mean"), AblateAttn(layer=1, mode="mean")]
    for labels, mode, message in ((["head 2.0"], "zero", "This model has no head 2.0"), (["MLP 5"], "zero", "no MLP 5"),
                                  (["head ²"], "zero", "is not something"), (["head 0.0 "], "zero", "is not something"),
                                  ([], "zero", "Choose what to switch off first"), (["head 0.0"], "half", "Choose how"),
                                  ([3], "zero", "is not something")):
        with pytest.raises(TargetError, match=message):
            parse_targets(labels, mode, cfg)


def test_the_experiment_view_shows_what_compare_computes(ctl, models, tokenizer):
    """Heads, a layer, neurons and a patch source from the page become the interventions `compare` takes, and the
    page's coupled runs (through the engine) are the library's bit for bit."""
    from gpt2viz.compare import compare
    from gpt2viz.interventions import AblateHeads, AblateMLP, AblateNeurons, Patch

    prompt = "The lighthouse keeper climbed"
    page = ctl.experiment(c.new_state("test"), "test", prompt, SETTINGS, c.Selection(layer=1, tab="experiment"),
                          ["head 1.0", "MLP 2", "head 1.3"], "mean", "0: 9, 3", "A fox walked on ice")
    assert not page.warning, page.status
    assert page.status.startswith("Changed: head 1.0, head 1.3, MLP 2, MLP 0 neurons 3, 9 set to their average; "
                                  "the residual stream entering layer 1 patched from 'A fox walked on ice'")
    exp = ctl.sessions.get(page.state, c.sampling_config(*SETTINGS)).experiment
    assert exp.interventions == [AblateHeads(layer=1, heads=(0, 3), mode="mean"), AblateMLP(layer=2, mode="mean"),
                                 AblateNeurons(layer=0, neurons=(3, 9), mode="mean"), Patch(hook="blocks.1.resid_pre", source="A fox walked on ice")]
    r = compare(models.get("test"), tokenizer, prompt, SamplingConfig(max_new_tokens=5, seed=0), exp.interventions)
    assert (exp.report.original_ids, exp.report.intervened_ids) == (r.original_ids, r.intervened_ids)
    np.testing.assert_array_equal(exp.report.tv, r.tv)
    np.testing.assert_array_equal(exp.report.logprob_intervened, r.logprob_intervened)
    page.build()
    assert page.views["exp_strips"].count('class="strip exp-strip"') == 2
    assert page.views["exp_loss"].layout.title.text == "Surprise at each token"
    for bad, message in ((dict(neurons="0: 99999"), "MLP 0 has neurons 0 to 511"), (dict(neurons="zero"), "Write neurons as"),
                         (dict(targets=[]), "Choose what to switch off first")):
        kw = dict(targets=["head 0.0"], neurons="", patch_text="") | bad
        page = ctl.experiment(c.new_state("test"), "test", prompt, SETTINGS, c.Selection(), kw["targets"], "zero", kw["neurons"], kw["patch_text"])
        assert page.warning and message in page.status


def test_the_why_tab_shows_the_attribution_the_neurons_and_the_draw(ctl, models, tokenizer):
    from gpt2viz.attribution import attribution
    from gpt2viz.sampling import uniform

    page = ctl.step(None, "test", "The lighthouse keeper climbed the", SETTINGS, c.Selection())
    page = ctl.step(page.state, "test", "The lighthouse keeper climbed the", SETTINGS, c.Selection())
    n = page.n_tokens
    shown = ctl.select(page.state, SETTINGS, c.Selection(position=n - 1, layer=1, head=2, tab="why"))
    assert set(shown.views) == {"why_dla", "why_neurons", "why_sampler"}
    session = ctl.sessions.get(shown.state, c.sampling_config(*SETTINGS)).session
    a = attribution(session, n - 2, session.ids[n - 1])
    dla = shown.views["why_dla"]
    said = f"{a.logit_diff:+.2f}</b> above" if a.logit_diff >= 0 else f"{-a.logit_diff:.2f} below</b>"
    assert said in dla and dla.count('class="why-cell') == 3 * 4 + 3  # every head and MLP
    assert 'data-layer="1" data-head="2" style' in dla and "why-cell ov-sel" in dla
    assert "MLP 1: the neurons behind its part" in shown.views["why_neurons"]
    step = session.steps[-1]
    assert f"u = <b>{uniform(0, step.position + 1):.4f}</b>" in shown.views["why_sampler"]
    assert "the same u would have drawn the same token" in shown.views["why_sampler"]  # same settings now as then
    hot = ctl.select(shown.state, [0.0] + SETTINGS[1:], c.Selection(position=n - 1, tab="why"))
    assert "temperature 0" in hot.views["why_sampler"]
    # another comparison token, then back to the runner-up; a bad one is refused
    vs = ctl.compare_with(shown.state, SETTINGS, c.Selection(position=n - 1, tab="why"), " are")
    assert vs.status.startswith("Comparing with ' are'") and "and not ·are" in vs.views["why_dla"]
    back = ctl.compare_with(vs.state, SETTINGS, c.Selection(position=n - 1, tab="why"), "")
    runner_up = show(tokenizer.decode([a.baseline]))
    assert back.state["versus"] is None and f"and not {runner_up}, after" in back.views["why_dla"]
    bad = ctl.compare_with(vs.state, SETTINGS, c.Selection(position=n - 1, tab="why"), " lighthouse keeper")
    assert bad.warning and "not a single token" in bad.status
    prompt_token = ctl.select(shown.state, SETTINGS, c.Selection(position=2, tab="why"))
    assert "part of your prompt: nothing was drawn" in prompt_token.views["why_sampler"]
    first = ctl.select(shown.state, SETTINGS, c.Selection(position=0, tab="why"))
    assert "first token" in first.views["why_dla"]


def test_the_lens_shows_ranks_entropy_and_where_each_token_was_decided(ctl, tokenizer):
    from gpt2viz.attribution import commitment, commitment_layers

    page = ctl.step(None, "test", "The lighthouse keeper climbed the stairs", SETTINGS, c.Selection())
    n = page.n_tokens
    session = ctl.sessions.get(page.state, c.sampling_config(*SETTINGS)).session
    start, end = c.window(n - 1, n, c.WINDOW_LENS)
    ranks = commitment(session, start, end).rank
    shown = ctl.select(page.state, SETTINGS, c.Selection(position=n - 1, tab="lens", lens_mode="rank"))
    fig = shown.views["lens"]
    assert "rank of the final guess" in fig.layout.title.text
    cells = [row[:-1] for row in fig.data[0].text]  # the last column names the final guess
    assert cells == [[str(int(v)) if v < 1000 else f"{v / 1000:.0f}k" for v in ranks[:, i]] for i in range(end - start)]
    entropy = ctl.select(page.state, SETTINGS, c.Selection(position=n - 1, tab="lens", lens_mode="entropy")).views["lens"]
    assert "unsure" in entropy.layout.title.text and fig.layout.xaxis.title.text.startswith("layer")
    strip = shown.views["lens_strip"]
    layers = commitment_layers(session, 0, n - 1)
    L = session.model.cfg.n_layer
    for p, layer in zip(range(1, n), layers):
        third = "last" if layer >= L else "early" if layer <= L / 3 else "middle" if layer <= 2 * L / 3 else "late"
        assert f'class="tok dec-{third}" title="token {p}:' in strip
    assert c.Selection.of(0, 0, 0, "lens", lens_mode="bogus").lens_mode == "top"


def test_a_share_link_replays_the_page_and_a_bad_one_says_why(ctl, models):
    from gpt2viz import share

    settings = [0.9, 0, 1.0, 1.0, 6, 3]
    prompt = "The lighthouse keeper climbed"
    page = ctl.step(None, "test", prompt, settings, c.Selection())
    page = ctl.force(page.state, "test", prompt, settings, c.Selection(), page.choices[3][1])
    page = ctl.step(page.state, "test", prompt, settings, c.Selection())
    page = ctl.experiment(page.state, "test", prompt, settings, c.Selection(layer=1), ["head 1.0"], "zero")
    original = ctl.sessions.get(page.state, c.sampling_config(*settings))
    link = ctl.share_link(page.state, prompt, settings, c.Selection(position=4, layer=2, head=1, tab="experiment"))
    opened = ctl.open_link(None, link)
    assert not opened.warning and opened.status.startswith("Opened a shared page: test, 3 generated tokens.")
    again = ctl.sessions.get(opened.state, c.sampling_config(*settings))
    assert again is not original and again.session.ids == original.session.ids
    assert [st.method for st in again.session.steps] == [st.method for st in original.session.steps] == ["sampled", "forced", "sampled"]
    assert again.experiment.interventions == original.experiment.interventions
    assert again.experiment.report.intervened_ids == original.experiment.report.intervened_ids
    assert (opened.selection.position, opened.selection.layer, opened.selection.head, opened.open_tab) == (4, 2, 1, "experiment")
    assert opened.settings == dict(zip(share.SETTING_NAMES, [0.9, 0, 1.0, 1.0, 6, 3]))
    assert opened.prompt == prompt
    # the select a mounting page sends, run after the link's text is in the state, is not drawn over it
    assert c.sent_before_link(opened.state, link_shown=False) and not c.sent_before_link(opened.state, link_shown=True)
    assert not c.sent_before_link(page.state, link_shown=False) and not c.sent_before_link(None, link_shown=False)
    # another server's models; a tampered link; no text yet
    elsewhere = share.encode(share.Shared("gpt2-xl", prompt, dict(zip(share.SETTING_NAMES, settings))))
    refused = ctl.open_link(None, elsewhere)
    assert refused.warning and "made with the model 'gpt2-xl'" in refused.status and "Available: test, other" in refused.status
    tampered = link[:20] + ("A" if link[20] != "A" else "B") + link[21:]
    bad = ctl.open_link(None, tampered)
    assert bad.warning and "link" in bad.status and bad.strip == c.empty_strip()
    assert ctl.share_link(None, prompt, settings, c.Selection()) == ""


def test_the_text_can_be_coloured_by_where_the_model_decided_each_token(ctl, tokenizer):
    from gpt2viz import trace as read_once

    prompt = "The lighthouse keeper climbed the stairs every night"
    sel = c.Selection(strip_colour="decided")
    page = ctl.step(None, "test", prompt, SETTINGS, sel)
    session = ctl.sessions.get(page.state, c.sampling_config(*SETTINGS)).session
    tr = read_once(session.model, tokenizer, session.ids)  # an independent pass: its own logit lens
    top = tr.lens_ids[:, :, 0]
    L = session.model.cfg.n_layer
    tokens = page.strip["tokens"]
    assert tokens[0]["c"] == "first"
    for p in range(1, len(tokens)):
        agree = top[:, p - 1] == top[-1, p - 1]  # the guess for token p is made reading p - 1
        layer = min(j for j in range(L + 1) if agree[j:].all())
        third = "last" if layer >= L else "early" if layer <= L / 3 else "middle" if layer <= 2 * L / 3 else "late"
        assert tokens[p]["c"] == f"dec-{third}" and tokens[p]["p"].startswith(f"token {p}: the model's top guess")
    assert "where the model decided" in page.strip_key and "dec-early" in page.strip_key
    plain = ctl.select(page.state, SETTINGS, c.Selection())
    assert "how likely" in plain.strip_key and all(not t["c"].startswith("dec-") for t in plain.strip["tokens"])
    # while a text streams, the tokens before it keep their colours and the new ones wait for the end
    pages = list(ctl.stream(page.state, "test", prompt, SETTINGS, sel))
    before = len(tokens)
    assert all(t["c"] == tokens[i]["c"] for i, t in enumerate(pages[0].strip["tokens"][:before]))
    assert all(t["c"] == "first" for t in pages[0].strip["tokens"][before:])
    after = ctl.select(pages[-1].state, SETTINGS, c.Selection(strip_colour="decided"))
    assert all(t["c"].startswith("dec-") for t in after.strip["tokens"][1:])
    assert c.Selection.of(0, 0, 0, "chosen", strip_colour="bogus").strip_colour == "prob"


def test_a_link_keeps_the_view_modes_and_the_why_comparison_token(ctl, tokenizer):
    prompt = "The lighthouse keeper climbed"
    page = ctl.step(None, "test", prompt, SETTINGS, c.Selection())
    page = ctl.compare_with(page.state, SETTINGS, c.Selection(tab="why"), " the")
    sel = c.Selection(position=2, tab="lens", lens_mode="entropy", strip_colour="decided")
    link = ctl.share_link(page.state, prompt, SETTINGS, sel)
    opened = ctl.open_link(None, link)
    assert (opened.selection.lens_mode, opened.selection.strip_colour) == ("entropy", "decided") and opened.modes
    assert opened.state["versus"] == tokenizer.encode(" the")[0] and opened.versus == " the"
    assert opened.strip["tokens"][1]["c"].startswith("dec-")


def test_a_rebuilt_session_keeps_how_each_token_came(models):
    """After eviction the text is read again in two passes; sampled tokens are drawn again (the same draws),
    the forced one stays forced, and the views are those of the original session."""
    store = c.Sessions(models, max_sessions=1)
    ctl = c.Controller(models, store)
    prompt = "The lighthouse keeper climbed"
    page = ctl.step(None, "test", prompt, SETTINGS, c.Selection())
    page = ctl.force(page.state, "test", prompt, SETTINGS, c.Selection(), page.choices[4][1])
    for _ in range(3):
        page = ctl.step(page.state, "test", prompt, SETTINGS, c.Selection())
    before = store.get(page.state, c.sampling_config(*SETTINGS)).session
    methods = [s.method for s in before.steps]
    assert methods == ["sampled", "forced", "sampled", "sampled", "sampled"] and page.state["methods"] == "sfsss"
    chosen = ctl.select(page.state, SETTINGS, c.Selection(position=len(before.ids) - 2)).views["chosen"]
    ctl.step(None, "test", "Another student's text", SETTINGS, c.Selection())  # evicts the first
    rebuilt = store.get(page.state, c.sampling_config(*SETTINGS)).session
    assert rebuilt is not before and rebuilt.ids == before.ids and [s.method for s in rebuilt.steps] == methods
    assert len(rebuilt.records) == len(rebuilt.ids)
    again = ctl.select(page.state, SETTINGS, c.Selection(position=len(before.ids) - 2)).views["chosen"]
    assert again.layout.title.text == chosen.layout.title.text and "drawn at random" in again.layout.title.subtitle.text
    np.testing.assert_allclose(again.data[1].x, chosen.data[1].x, atol=2e-4)
    forced = {**page.state, "methods": None}  # an older page's state: every token said to be given
    store.drop(forced["key"])
    assert [s.method for s in store.get(forced, c.sampling_config(*SETTINGS)).session.steps] == ["forced"] * 5


def test_the_newest_answer_a_page_asked_for_wins():
    order = c.ViewOrder(capacity=2)
    tab, click = order.ticket("a"), order.ticket("a")
    other = order.ticket("b")
    assert order.may_show("a", click)  # the click's answer arrives first ...
    assert not order.may_show("a", tab)  # ... so the tab's, asked for before it, is dropped
    assert order.may_show("b", other)  # another page's order is its own
    view, step, later = order.ticket("a"), order.ticket("a"), order.ticket("a")
    assert order.may_show("a", later) and order.may_show("a", step, always=True)  # a text-changing answer always lands
    assert not order.may_show("a", view)  # a view asked for before it is stale
    order.ticket("c"), order.ticket("d")  # "a" forgotten beyond the capacity: its next answers start afresh
    assert order.may_show("a", order.ticket("a"))


def test_a_slow_tab_answer_does_not_undo_a_later_click_on_a_token(models):
    """The race behind a lost click: the Chosen tab's redraw (at the newest token) still running when the user
    clicks an earlier token; the click's answer lands first and the tab's, when it comes, is dropped."""
    import threading
    from types import SimpleNamespace

    import gradio as gr

    import app

    release, entered = threading.Event(), threading.Event()

    class SlowFirst(c.Controller):
        calls = 0

        def select(self, *args, **kw):
            SlowFirst.calls += 1
            if SlowFirst.calls == 1:
                entered.set()
                assert release.wait(30)
            return super().select(*args, **kw)

    ctl = SlowFirst(models, c.Sessions(models))
    demo = app.build(models, c.Sessions(models), ctl)
    page = ctl.step(None, "test", "Hi there, friend", SETTINGS, c.Selection())
    state = page.state
    fns = {f.fn.__qualname__.split("<locals>.", 1)[-1]: f.fn for f in demo.fns.values() if f.fn}
    request = SimpleNamespace(session_hash="page-1", client=SimpleNamespace(host="127.0.0.1"), headers={})
    view = [None, 0, 0, "chosen", False, False, "top", "prob"]
    results = {}
    tab = threading.Thread(target=lambda: results.setdefault("tab", fns["on_tab.<locals>.handler"](state, False, *SETTINGS, *view, request)))
    tab.start()
    assert entered.wait(30)
    results["click"] = fns["on_strip_click"](state, *SETTINGS, *view, SimpleNamespace(position=1), request)
    release.set()
    tab.join(30)
    assert results["tab"] == gr.skip()  # dropped: the page keeps the click's answer
    chosen = next(v for k, v in results["click"].items() if getattr(k, "elem_id", None) == "chosen_plot")
    assert "for token 1 " in chosen.layout.title.text  # the clicked token's, not the newest's


def test_every_streamed_state_says_how_each_of_its_tokens_came(models):
    """A page's state mid-stream is what a rebuild after eviction reads: its methods match its ids."""
    store = c.Sessions(models, max_sessions=1)
    ctl = c.Controller(models, store)
    prompt = "The lighthouse keeper climbed"
    page = ctl.step(None, "test", prompt, SETTINGS, c.Selection())
    page = ctl.force(page.state, "test", prompt, SETTINGS, c.Selection(), page.choices[4][1])  # "sf" so far
    pages = list(ctl.stream(page.state, "test", prompt, SETTINGS[:4] + [4, 0], c.Selection()))
    streamed = [p.state for p in pages[:-1]]
    assert streamed and all(len(st["methods"]) == len(st["ids"]) - st["prompt_len"] for st in streamed)
    assert all(st["methods"].startswith("sf") and set(st["methods"][2:]) == {"s"} for st in streamed)
    mid = streamed[0]
    ctl.step(None, "test", "Another student's text", SETTINGS, c.Selection())  # evicts the first
    rebuilt = store.get({**mid}, c.sampling_config(*SETTINGS)).session
    assert rebuilt.ids == mid["ids"] and "".join(c.METHOD_LETTERS[s.method] for s in rebuilt.steps) == mid["methods"]
