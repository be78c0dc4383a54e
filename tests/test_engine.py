"""The engine loop: sessions stepped together in one batched pass get exactly what they get alone.

The reference for every session is the same session run alone through `GenerationSession`'s own
module path (`GPT2.forward` with hooks), never the batched body under test. A batched matrix
product does not round exactly as a single row does (differences ~1e-6), so a sampled token can
only match its solo run where the draw does not fall that close to a boundary between two tokens:
token-for-token comparisons run on a trained model (peaked distributions, the bundled one); the
random-weight gpt2-shaped model, whose distributions are nearly flat, is compared capture for
capture with the solo run forced to the same tokens.
"""

import gc
import threading
import time

import numpy as np
import pytest
import torch

from gpt2viz import GenerationSession, SamplingConfig, load_model
from gpt2viz.engine import Engine, Generation, Overloaded, Who
from gpt2viz.generation import read_together
from gpt2viz.model import SLAB_ROWS, SLABS, SPARE_ROWS, KVCache, attend_rows, packed_linear, slab_groups
from gpt2viz.interventions import AblateHeads, AblateMLP, AblateNeurons, ScaleHead, Steer

PROMPTS = ["The quick brown fox", "Once upon a time there was a", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21",
           "Hello", "In the beginning", "A B C", "Shall I compare thee to a summer's day? Thou art more lovely",
           "Paris is the capital of"]
CONFIGS = [SamplingConfig(seed=1), SamplingConfig(temperature=0), SamplingConfig(temperature=0.7, top_k=20, seed=5),
           SamplingConfig(top_p=0.8, seed=2), SamplingConfig(repetition_penalty=1.5, seed=9),
           SamplingConfig(temperature=1.3, seed=11), SamplingConfig(top_k=3, seed=4), SamplingConfig(seed=123)]


@pytest.fixture(scope="module")
def model(hf_checkpoints):
    return load_model(hf_checkpoints["distil"][1])  # 6 layers x 12 heads, 768 wide, context 128


@pytest.fixture(scope="module")
def trained():
    return load_model("tiny-shakespeare")


def alone(model, tokenizer, i, n, force=None, prompt=None, interventions=()):
    s = GenerationSession(model, tokenizer, prompt or PROMPTS[i], CONFIGS[i], record=True, interventions=interventions)
    for k in range(n):
        s.step(force=(force or {}).get(k))
    s.read()
    return s


def assert_same(batched, solo):
    assert batched.ids == solo.ids
    assert len(batched.records) == len(solo.records) == len(solo.ids)
    for a, b in zip(batched.records.resid, solo.records.resid):
        np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(batched.records.logprobs[1:], solo.records.logprobs[1:], atol=1e-4)
    for a, b in zip(batched.steps, solo.steps):
        np.testing.assert_allclose([c.prob_final for c in a.candidates], [c.prob_final for c in b.candidates], atol=1e-5)
    n, last = len(solo.ids), solo.model.cfg.n_layer - 1
    np.testing.assert_allclose(batched.attention_pattern(last, 0, n), solo.attention_pattern(last, 0, n), atol=1e-4)
    np.testing.assert_allclose(batched._kv.keys(last), solo._kv.keys(last), atol=1e-4)


def run_all(engine, sessions, n_tokens, kw=None, queued_first=False):
    """Generate in every session at once (one waiter thread each, as Gradio's handlers are). `queued_first`: every
    generation is queued before the loop's first look (else which pass takes whom races with the threads' start)."""
    errors, locks = [], [threading.Lock() for _ in sessions]

    def start(i, s):
        return engine.generate(s, locks[i], n_tokens[i], who=Who(f"user{i}", "10.0.0.1"), **(kw or {}).get(i, {}))

    if queued_first:
        with engine._cv:
            runs = [start(i, s) for i, s in enumerate(sessions)]

    def wait(i, s):
        try:
            for _ in runs[i] if queued_first else start(i, s):
                pass
            engine.read(s, locks[i])  # the last token, which the engine reads after handing it over
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=wait, args=(i, s)) for i, s in enumerate(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors


def test_eight_sessions_batched_get_what_each_gets_alone(trained, tokenizer):
    engine = Engine(prefill_tokens=8)  # small chunks: long prompts are read over several iterations, between decode steps
    n_tokens = [12, 5, 20, 1, 9, 15, 3, 17]
    forced = {2: {"force": [None, None, 318, None, 11]}}  # forcing inside a batch
    sessions = [GenerationSession(trained, tokenizer, PROMPTS[i], CONFIGS[i], record=True) for i in range(8)]
    run_all(engine, sessions, n_tokens, forced)
    assert engine.stats["batched_rows"] > 2 * engine.stats["iterations"]  # several rows per pass: it did batch
    for i, s in enumerate(sessions):
        engine.read(s, threading.Lock())
        force = {k: t for k, t in enumerate(forced.get(i, {}).get("force", [])) if t is not None}
        solo = alone(trained, tokenizer, i, n_tokens[i], force)
        assert [st.method for st in s.steps] == [st.method for st in solo.steps]
        assert_same(s, solo)


def test_batched_is_bit_for_bit_what_the_engine_computes_for_a_session_alone(model, tokenizer):
    """On nearly flat distributions (random weights) any difference in rounding would change sampled tokens."""
    n_tokens = [14, 6, 9, 11, 3, 8, 12, 5]
    together = [GenerationSession(model, tokenizer, PROMPTS[i], CONFIGS[i], record=True) for i in range(8)]
    run_all(Engine(prefill_tokens=8), together, n_tokens)
    for i, s in enumerate(together):
        solo = GenerationSession(model, tokenizer, PROMPTS[i], CONFIGS[i], record=True)
        run_all(Engine(prefill_tokens=8), [solo], [n_tokens[i]])
        assert s.ids == solo.ids
        for a, b in zip(s.records.resid, solo.records.resid):
            np.testing.assert_array_equal(a, b)
        assert [st.candidates[0].prob_final for st in s.steps] == [st.candidates[0].prob_final for st in solo.steps]


INTERVENTIONS = {1: [AblateHeads(layer=2, heads=(0, 5, 11))], 3: [AblateMLP(layer=1, mode="mean"), ScaleHead(layer=4, head=3, factor=2.0)],
                 6: [Steer(layer=3, plus="summer", minus="winter", scale=2.0)], 7: [AblateNeurons(layer=5, neurons=(1, 2, 3000))]}


def test_sessions_with_interventions_batched_with_plain_ones_get_what_each_gets_alone(model, tokenizer):
    """Each session's interventions travel with it into the batched pass and touch only its rows."""
    n_tokens = [7, 9, 4, 8, 3, 6, 10, 5]

    def session(i):
        return GenerationSession(model, tokenizer, PROMPTS[i], CONFIGS[i], record=True, interventions=INTERVENTIONS.get(i, ()))

    together = [session(i) for i in range(8)]
    run_all(Engine(prefill_tokens=8), together, n_tokens)
    for i, s in enumerate(together):
        solo = session(i)
        run_all(Engine(prefill_tokens=8), [solo], [n_tokens[i]])
        assert s.ids == solo.ids
        for a, b in zip(s.records.resid, solo.records.resid):
            np.testing.assert_array_equal(a, b)
        # and the engine's body makes the same edits as the module path (hooks), to rounding
        engine = Engine(prefill_tokens=8)
        engine.read(s, threading.Lock())
        assert_same(s, alone(model, tokenizer, i, n_tokens[i], {k: st.token_id for k, st in enumerate(s.steps)},
                             interventions=INTERVENTIONS.get(i, ())))


def test_batched_captures_equal_the_module_path_on_a_gpt2_sized_layer(model, tokenizer):
    engine = Engine(prefill_tokens=16)
    n_tokens = [6, 2, 9, 4]
    sessions = [GenerationSession(model, tokenizer, PROMPTS[i], CONFIGS[i], record=True) for i in range(4)]
    run_all(engine, sessions, n_tokens)
    for i, s in enumerate(sessions):
        engine.read(s, threading.Lock())
        assert_same(s, alone(model, tokenizer, i, n_tokens[i], {k: st.token_id for k, st in enumerate(s.steps)}))


def test_sessions_join_and_leave_mid_way_and_one_stop_leaves_the_others(trained, tokenizer):
    engine = Engine()
    a, b, c = (GenerationSession(trained, tokenizer, PROMPTS[i], CONFIGS[i], record=True) for i in range(3))
    gen_a = iter(engine.generate(a, threading.Lock(), 30, who=Who("a")))
    for _ in range(5):
        next(gen_a)
    gen_b = iter(engine.generate(b, threading.Lock(), 10, who=Who("b")))  # joins while a is generating
    got_b = [d.step.token_id for d in gen_b]
    gen_c = engine.generate(c, threading.Lock(), 30, who=Who("c"))
    it_c = iter(gen_c)
    for _ in range(4):
        next(it_c)
    gen_c.cancel()  # c stops; a goes on
    rest_a = [d.step.token_id for d in gen_a]
    assert len(got_b) == 10 and len(rest_a) == 25
    assert 4 <= len(c.steps) <= 6  # stopped within the tokens already handed over (the waiter may lag by two)
    for i, s, n in ((0, a, 30), (1, b, 10)):
        engine.read(s, threading.Lock())
        assert_same(s, alone(trained, tokenizer, i, n))
    solo_c = alone(trained, tokenizer, 2, len(c.steps))
    assert c.ids == solo_c.ids


def test_texts_never_mix_and_a_client_over_its_cap_is_refused_while_another_is_served(trained, tokenizer):
    engine = Engine(max_jobs_per_owner=1, max_jobs_per_client=2)
    mine = [GenerationSession(trained, tokenizer, "Hello", SamplingConfig(seed=i), record=True) for i in range(3)]
    greedy = engine.generate(mine[0], threading.Lock(), 40, who=Who("x1", "1.1.1.1"), rate=20)
    first = engine.generate(mine[1], threading.Lock(), 40, who=Who("x2", "1.1.1.1"), rate=20)
    with pytest.raises(Overloaded, match="network address"):
        engine.generate(mine[2], threading.Lock(), 40, who=Who("x3", "1.1.1.1"))
    with pytest.raises(Overloaded, match="already have requests"):
        engine.generate(mine[2], threading.Lock(), 40, who=Who("x1", "2.2.2.2"))
    other = GenerationSession(trained, tokenizer, "Hello", SamplingConfig(seed=0), record=True)
    started = time.monotonic()
    got = [d for d in engine.generate(other, threading.Lock(), 3, who=Who("y", "3.3.3.3"))]
    assert len(got) == 3 and time.monotonic() - started < 30
    greedy.cancel()
    first.cancel()
    time.sleep(0.3)
    for s in (mine[0], mine[1], other):  # each has its own text: what it would get alone, beside the others
        ref = GenerationSession(trained, tokenizer, "Hello", s.config, record=True)
        for _ in s.steps:
            ref.step()
        assert s.ids == ref.ids
    assert mine[0].ids != mine[1].ids


def test_calls_run_on_the_engine_and_errors_reach_the_waiter(model, tokenizer):
    engine = Engine()
    s = GenerationSession(model, tokenizer, "Hello there", SamplingConfig(), record=True)
    names = []
    assert engine.call(s, threading.Lock(), lambda: names.append(threading.current_thread().name) or 7) == 7
    assert names == ["gpt2viz-engine"]
    with pytest.raises(ZeroDivisionError):
        engine.call(s, threading.Lock(), lambda: 1 / 0)
    engine.read(s, threading.Lock())
    assert len(s.records) == 2 and s.pending


def test_a_session_that_does_not_record_is_stepped_alone_with_its_captures(trained, tokenizer):
    engine = Engine()
    s = GenerationSession(trained, tokenizer, "Hello there", SamplingConfig(seed=3))
    ref = GenerationSession(trained, tokenizer, "Hello there", SamplingConfig(seed=3))
    got = [d.step for d in engine.generate(s, threading.Lock(), 4)]
    for step in got:
        want = ref.step()
        assert step.token_id == want.token_id
        np.testing.assert_array_equal(step.attention, want.attention)  # the same solo pass, bit for bit


def test_forward_ragged_equals_forward_sequence_by_sequence(model):
    torch.manual_seed(0)
    seqs = [torch.randint(0, 50257, (n,)) for n in (7, 1, 30, 4)]
    caches = [model.new_kv_cache() for _ in seqs]
    for kv, t in zip(caches[:2], seqs[:2]):
        model(t[None], kv_cache=kv)  # two of them continue a cached text, two start fresh
    new = [torch.randint(0, 50257, (n,)) for n in (1, 1, 30, 4)]
    out = model.forward_ragged([new[0], new[1], seqs[2], seqs[3]], caches)
    for i, (kv, past) in enumerate(zip(caches, (7, 1, 0, 0))):
        ids = torch.cat([seqs[i], new[i]]) if past else seqs[i]
        _, cache = model.run_with_cache(ids[None], names=["resid_post"])
        ref = cache["resid_post", -1][0, past:]
        np.testing.assert_allclose(out.resid[-1, out.rows(i)], ref, atol=1e-4)
        assert kv.length == len(ids)


def test_a_slow_waiter_gets_the_tokens_made_meanwhile_in_one_batch_and_the_engine_runs_ahead_a_bounded_way(trained, tokenizer):
    engine = Engine(max_ahead=4)
    s = GenerationSession(trained, tokenizer, "ROMEO:", SamplingConfig(seed=7), record=True)
    run = engine.generate(s, threading.Lock(), 12)
    batches = []
    for got in run.batches():
        batches.append(got)
        time.sleep(0.5)  # a busy web server: several passes while this waiter sends one message
    sizes = [len(b) for b in batches]
    assert sum(sizes) == 12 and max(sizes) > 1 and max(sizes) <= 4  # never more than max_ahead waiting
    tokens = [d.step.token_id for b in batches for d in b]
    assert tokens == [st.token_id for st in s.steps] == s.ids[-12:]
    assert [d.ids for d in batches[-1]][-1] == s.ids  # the newest snapshot is the whole text
    solo = GenerationSession(trained, tokenizer, "ROMEO:", SamplingConfig(seed=7), record=True)
    for _ in range(12):
        solo.step()
    assert solo.ids == s.ids  # the same tokens as stepping alone, however they were waited for


def test_an_error_after_tokens_reaches_the_waiter_after_them(trained, tokenizer):
    engine = Engine()
    s = GenerationSession(trained, tokenizer, "ROMEO:", SamplingConfig(seed=7), record=True)
    run = engine.generate(s, threading.Lock(), 3, force=[None, None, 10**9])  # the third token is no token
    got = []
    with pytest.raises(ValueError, match="forced token id"):
        for batch in run.batches():
            got += batch
    assert len(got) == 2 and s.ids[-2:] == [d.step.token_id for d in got]


def test_a_class_on_one_example_reads_it_once_and_each_gets_what_it_gets_alone(model, tokenizer):
    """Six sessions start the same prompt (their own seeds and settings), two start others, one of those with an
    intervention (never shared): the prompt is read once, and every session's numbers are bit for bit its own."""
    prompt = PROMPTS[6]  # 17 tokens: two chunks of 8 and one of 1 with prefill_tokens=8
    specs = [(prompt, CONFIGS[i], ()) for i in range(6)] + [(PROMPTS[0], CONFIGS[6], ()),
                                                             (prompt, CONFIGS[7], INTERVENTIONS[1])]
    n_tokens = [5, 8, 3, 6, 7, 4, 5, 6]

    def session(i):
        text, cfg, edits = specs[i]
        return GenerationSession(model, tokenizer, text, cfg, record=True, interventions=edits)

    first = [session(i) for i in range(8)]  # one pass over all eight: the shared prompt's rows computed once
    n_prompt, n_other = len(first[0].prompt_ids), len(first[6].prompt_ids)
    assert read_together(first) == n_prompt + n_other + n_prompt  # the shared one, the other, the edited one
    for s in first[1:6]:
        assert s.pending and s.records.logprobs[1:] == first[0].records.logprobs[1:] and s._pending.logits.equal(first[0]._pending.logits)
    together, engine = [session(i) for i in range(8)], Engine(prefill_tokens=8)
    run_all(engine, together, n_tokens)  # through the engine, arriving as they come
    for i, s in enumerate(together):
        solo = session(i)
        run_all(Engine(prefill_tokens=8), [solo], [n_tokens[i]])
        assert s.ids == solo.ids and s.records.logprobs[1:] == solo.records.logprobs[1:]
        for a, b in zip(s.records.resid, solo.records.resid):
            np.testing.assert_array_equal(a, b)
        for layer in (0, model.cfg.n_layer - 1):
            np.testing.assert_array_equal(s._kv.keys(layer), solo._kv.keys(layer))
            np.testing.assert_array_equal(s.attention_pattern(layer, 0, len(s.ids)), solo.attention_pattern(layer, 0, len(s.ids)))
        assert [st.candidates for st in s.steps] == [st.candidates for st in solo.steps]
    assert together[0]._kv.keys(0).data_ptr() != together[1]._kv.keys(0).data_ptr()  # copies, not shared caches


def test_a_prompt_read_in_an_earlier_pass_is_taken_not_read_again_and_the_numbers_are_the_same(model, tokenizer):
    prompt = PROMPTS[6]
    engine = Engine(prefill_tokens=8)
    first = GenerationSession(model, tokenizer, prompt, CONFIGS[0], record=True)
    run_all(engine, [first], [4])
    rows = engine.stats["batched_rows"]
    later = [GenerationSession(model, tokenizer, prompt, CONFIGS[i], record=True) for i in (2, 5)]
    edited = GenerationSession(model, tokenizer, prompt, CONFIGS[3], record=True, interventions=INTERVENTIONS[1])
    run_all(engine, later + [edited], [6, 3, 2])
    assert engine.stats["prompts_adopted"] == 2  # the edited one reads its own (its numbers are not the others')
    assert engine.stats["batched_rows"] - rows <= 6 + 3 + len(edited.prompt_ids) + 2 + 3  # no prompt read twice
    for s, cfg, n in ((later[0], CONFIGS[2], 6), (later[1], CONFIGS[5], 3)):
        solo = GenerationSession(model, tokenizer, prompt, cfg, record=True)
        run_all(Engine(prefill_tokens=8), [solo], [n])
        engine.read(s, threading.Lock())
        assert s.ids == solo.ids and s.records.logprobs[1:] == solo.records.logprobs[1:]
        for a, b in zip(s.records.resid, solo.records.resid):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(s._kv.keys(2), solo._kv.keys(2))
        assert [st.candidates for st in s.steps] == [st.candidates for st in solo.steps]
    first.rewind(0)  # its prompt's reading is gone: nobody can take it any more
    again = GenerationSession(model, tokenizer, prompt, CONFIGS[1], record=True)
    assert not again.adopt_prompt(first)


def test_sessions_adopting_one_reading_share_one_unembedding_and_get_the_logits_of_their_own_pass(model, tokenizer, monkeypatch):
    """A class on one example: the first adopter unembeds the prompt's last row, the others take a copy of it
    (each unembedding streams the whole vocabulary's matrix; thirty of them cost a class's first pass a quarter
    of a second). Each copy is the session's own: what `read_together` computes for the prompt read alone."""
    prompt = PROMPTS[2]
    first = GenerationSession(model, tokenizer, prompt, CONFIGS[0], record=True)
    run_all(Engine(), [first], [1])
    solo = GenerationSession(model, tokenizer, prompt, CONFIGS[1], record=True)
    read_together([solo])
    calls = []
    unembed = model.unembed_rows
    monkeypatch.setattr(model, "unembed_rows", lambda rows: calls.append(len(rows)) or unembed(rows))
    adopters = [GenerationSession(model, tokenizer, prompt, CONFIGS[i], record=True) for i in range(4)]
    assert all(s.adopt_prompt(first) for s in adopters)
    assert calls == [1]
    for s in adopters:
        assert torch.equal(s._pending.logits, solo._pending.logits)
    adopters[0]._pending.logits.zero_()  # each holds its own copy
    assert torch.equal(adopters[1]._pending.logits, solo._pending.logits)
    again = GenerationSession(model, tokenizer, prompt, CONFIGS[2], record=True)
    assert again.adopt_prompt(adopters[3]) and calls == [1]  # an adopter passes the same reading on


def test_a_generation_hands_over_its_last_token_before_the_pass_that_reads_it_and_calls_wait_for_that_pass(trained, tokenizer):
    """The waiter has every token (and the end) as soon as the last one is chosen: its message need not wait a pass.
    The last token is read in the next batched pass, and a call on the session (the views) runs only after it, so it
    sees the text read. Driven iteration by iteration on this thread (no loop thread): the order is the engine's."""
    from gpt2viz.engine import _DONE, Delivered, _Job

    s = GenerationSession(trained, tokenizer, "ROMEO:", SamplingConfig(seed=3), record=True)
    engine, lock = Engine(), threading.Lock()
    job = _Job(s, lock, Who("a"), n_tokens=2)
    engine._jobs.append(job)
    engine._iterate([job], 0)  # reads the prompt, chooses the first token
    engine._iterate([job], 1)  # reads it, chooses the second: the last
    got = [job.out.get_nowait() for _ in range(job.out.qsize())]
    assert [type(x) for x in got[:2]] == [Delivered, Delivered] and got[2:] == [_DONE]
    assert s.unread() == [s.ids[-1]] and got[1].ids == s.ids  # handed over before it is read
    Generation(engine, job).cancel()  # the waiter leaving does not cancel that read
    assert not job.cancelled
    seen = []
    call = _Job(s, lock, Who("a"), fn=lambda: seen.append(list(s.unread())) or "drawn")
    engine._jobs.append(call)
    engine._iterate([call], 2)  # only the call is ready: it waits, the text is not read yet
    assert seen == [] and call.out.empty()
    engine._iterate([job, call], 3)  # the pass reads the last token, then the call runs
    assert seen == [[]] and call.out.get_nowait() == "drawn" and not engine._jobs
    alone = GenerationSession(trained, tokenizer, "ROMEO:", SamplingConfig(seed=3), record=True)
    run_all(Engine(), [alone], [2])  # through the loop thread, waiting for the last read
    assert alone.ids == s.ids and alone.records.logprobs[1:] == s.records.logprobs[1:]
    for a, b in zip(alone.records.resid, s.records.resid):
        np.testing.assert_array_equal(a, b)


def test_a_stream_spaced_by_its_gap_sends_the_tokens_made_meanwhile_together(trained, tokenizer):
    """With a class generating, a waiter lets `every()` seconds pass between two messages (`Controller._stream_gap`):
    fewer messages, the same tokens in order; the engine counts the generations running."""
    engine = Engine(max_ahead=64)
    s = GenerationSession(trained, tokenizer, "ROMEO:", SamplingConfig(seed=7), record=True)
    run = engine.generate(s, threading.Lock(), 20, rate=20)  # a second in all
    running, times, batches = [], [], []
    for got in run.batches(lambda: running.append(engine.generating()) or 0.3):
        times.append(time.monotonic())
        batches.append(got)
    assert [d.step.token_id for b in batches for d in b] == s.ids[-20:]
    assert max(map(len, batches)) > 1 and all(b - a >= 0.29 for a, b in zip(times, times[1:-1]))  # the last comes when done
    assert running[0] == 1 and engine.generating() == 0


def test_a_class_arriving_over_some_milliseconds_starts_in_one_pass_and_one_student_never_waits(trained, tokenizer):
    """A class's Generate requests reach the engine over ~0.1 s: while generations keep arriving (none older than
    `gather_max`) the next pass waits for them (`Engine._gather`), so the class starts in one pass instead of a pass
    per few arrivals. One job alone, a call, or a generation under way for longer never waits."""
    from gpt2viz.engine import _Job

    words = ["night", "day", "sun", "moon", "rose", "crown", "sword", "heart"]
    run_all(Engine(), [GenerationSession(trained, tokenizer, "ROMEO:", record=True)], [1])  # the model's first pass, apart

    class Counting(Engine):
        def _forward(self, model, reading, later):
            self.prompts_read.append(sum(len(ids) > 1 for _, ids in reading))  # the prompts this pass reads
            super()._forward(model, reading, later)

    def class_(**gather):
        engine = Counting(**gather)
        engine.prompts_read = []
        sessions = [GenerationSession(trained, tokenizer, f"ROMEO: good {w}", SamplingConfig(seed=i), record=True)
                    for i, w in enumerate(words)]
        locks = [threading.Lock() for _ in sessions]
        runs = []
        for i, s in enumerate(sessions):
            runs.append(engine.generate(s, locks[i], 30, who=Who(f"user{i}")))
            time.sleep(0.01)  # one arrives every 10 ms: a pass of this small model takes a few
        for run, s, lock in zip(runs, sessions, locks):
            assert len(list(run)) == 30
            engine.read(s, lock)
        return [n for n in engine.prompts_read if n], sessions, locks

    read, sessions, locks = class_(gather_gap=0.05, gather_max=2.0)
    assert read in ([1, 7], [8])  # the first alone (the first pass, before the others came), the other seven together
    assert len(class_(gather_gap=0.0)[0]) >= 5  # not waiting: a pass for (nearly) every arrival

    engine, now = Engine(), time.monotonic()
    fresh = [_Job(s, locks[0], Who("a"), n_tokens=5, submitted=now - 0.01) for s in sessions[:2]]
    assert engine._gather(fresh[:1], now) == 0  # one student alone
    assert engine.gather_gap == 0.015 and 0.004 < engine._gather(fresh, now) < 0.006  # the gap after the last arrival
    assert engine._gather(fresh + [_Job(None, None, Who("b"), fn=lambda: 0, submitted=now)], now) == 0  # a call waits for none
    under_way = _Job(sessions[2], locks[0], Who("c"), n_tokens=5, submitted=now - 3.0)
    assert engine._gather(fresh + [under_way], now) == 0


def test_a_class_starting_together_has_its_prompts_read_in_fewer_passes_with_the_same_numbers(trained, tokenizer):
    """While many texts wait for their first token, a pass reads more prompt chunks (`Engine.prefill_budget`); chunk
    boundaries stay at multiples of `prefill_tokens`, so each session gets what it gets alone."""
    prompts = [f"{name}: {word} my lord, the {thing}" for name, word, thing in
               zip(["ROMEO", "JULIET", "KING", "QUEEN", "HAMLET", "LEAR", "ANNE", "PAGE"] * 2,
                   ["Good", "Fair", "Sweet", "Hark", "Alas", "Now", "Come", "Peace"] * 2,
                   ["night", "day", "sun", "moon", "rose", "crown", "sword", "heart"] * 2)]
    sessions = [GenerationSession(trained, tokenizer, p + " " * (i // 8), SamplingConfig(seed=i), record=True) for i, p in enumerate(prompts)]
    engine = Engine(prefill_tokens=16)
    assert engine.prefill_budget([]) == 16
    run_all(engine, sessions, [1] * 16)
    prompt_tokens = sum(len(s.prompt_ids) for s in sessions)
    assert prompt_tokens > 16 * 8  # at one chunk's budget a pass reads ~2 of these prompts: 8 passes or more
    assert engine.stats["iterations"] <= 6
    for i, s in enumerate(sessions):
        solo = GenerationSession(trained, tokenizer, s.prompt_ids, SamplingConfig(seed=i), record=True)
        run_all(Engine(prefill_tokens=16), [solo], [1])
        assert solo.ids == s.ids
        for a, b in zip(s.records.resid, solo.records.resid):
            np.testing.assert_array_equal(a, b)


def test_first_tokens_go_out_before_the_prompts_are_scored_and_the_scores_are_those_of_a_session_alone(model, tokenizer):
    """The engine chooses a pass's tokens before it scores the prompts' tokens (`read_together(later=...)`): the
    first token's snapshot has NaN for them; the session's records then hold, bit for bit, what the scoring in
    the pass itself gives a session read alone; one that shares another's reading of the same text gets them too."""
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[6], PROMPTS[2]]  # the last starts the same text as the second
    sessions = [GenerationSession(model, tokenizer, p, SamplingConfig(seed=i), record=True) for i, p in enumerate(prompts)]
    engine = Engine(prefill_tokens=8)  # chunks: a prompt's earlier chunks are scored in their own passes
    firsts = {}

    def wait(i, s):
        for d in engine.generate(s, threading.Lock(), 3):
            firsts.setdefault(i, d.logprobs)

    threads = [threading.Thread(target=wait, args=(i, s)) for i, s in enumerate(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, s in enumerate(sessions):
        n = len(s.prompt_ids)
        chunk_end = (n - 1) // 8 * 8  # the last chunk's rows are scored after its first token was chosen
        assert all(np.isnan(x) for x in firsts[i][chunk_end + 1:n]) and len(firsts[i]) == n + 1
        assert not any(np.isnan(x) for x in s.records.logprobs[1:])
        solo = GenerationSession(model, tokenizer, prompts[i], SamplingConfig(seed=i), record=True)
        for start in range(0, n, 8):
            read_together([solo], [solo.unread()[:8]])  # the same chunks, each scored in its own pass
        assert solo.records.logprobs[1:] == s.records.logprobs[1:n]
    n = len(sessions[1].prompt_ids)
    assert sessions[3].records.logprobs[1:n] == sessions[1].records.logprobs[1:n]


def test_a_pass_takes_at_most_max_batch_generations_and_everyone_still_finishes(trained, tokenizer, monkeypatch):
    from gpt2viz import engine as engine_module

    sizes, read = [], engine_module.read_together
    monkeypatch.setattr(engine_module, "read_together", lambda s, seg, later=None: sizes.append(len(s)) or read(s, seg, later))
    sessions = [GenerationSession(trained, tokenizer, PROMPTS[i], CONFIGS[i], record=True) for i in range(7)]
    run_all(Engine(max_batch=3), sessions, [4] * 7, queued_first=True)  # the count of full passes below is no race
    assert max(sizes) == 3 and sizes.count(3) >= 7 * 4 // 3  # full passes of 3, never more
    assert [len(s.steps) for s in sessions] == [4] * 7


def test_one_row_gets_from_every_packed_product_what_it_gets_among_many(model):
    """The engine's bit-for-bit promise rests on this: a row's product does not depend on the other rows, one row
    alone included (on AVX-512 CPUs oneDNN multiplies a single 3072-wide row with other rounding; `packed_linear`
    then multiplies it as two)."""
    torch.manual_seed(1)
    for w in [w for layer in model._packed_weights()[:-1] for w in layer][:4] + [model._packed_weights()[-1]]:
        x = torch.randn(5, w.shape[1])
        many = packed_linear(x, w, None)
        for i in range(5):
            assert torch.equal(packed_linear(x[i:i + 1], w, None)[0], many[i])
        assert torch.equal(packed_linear(x[:2], w, None), many[:2])


def _attention_f64(q, keys, values):
    """softmax(q kᵀ / √D) v in float64, per head: q [H, D], keys/values [H, S, D] -> [H, D]."""
    q, keys, values = q.double(), keys.double(), values.double()
    p = torch.softmax(torch.einsum("hd,hsd->hs", q, keys) / q.shape[-1] ** 0.5, dim=-1)
    return torch.einsum("hs,hsd->hd", p, values)


def test_decode_rows_sharing_a_slab_attend_together_as_each_alone_and_as_attention_is_defined():
    """`attend_rows` for rows of one slab (not side by side, different lengths in one bucket, rows of others
    holding NaN between them): each row's z is bit for bit what it gets in a group of its own, and within 1e-5
    of softmax(q kᵀ/√D) v computed in float64; the new keys and values land at each row's position."""
    torch.manual_seed(2)
    H, D, n_layer = 4, 16, 1
    caches = [KVCache(n_layer) for _ in range(5)]
    lengths = [70, 100, 127, 65, 90]  # one bucket (65..128): one group
    texts = []
    for kv, n in zip(caches, lengths):
        k, v = torch.randn(H, n, D), torch.randn(H, n, D)
        kv.extend(0, k, v)
        kv.length = n
        texts.append((k, v))
    slab = caches[0].slab
    assert all(kv.slab is slab for kv in caches) and len({kv.row for kv in caches}) == 5
    del caches[1]  # its row is given back; fill it (and every other free row) with NaN
    gc.collect()
    for r in slab.free:
        slab.k[0][r], slab.v[0][r] = float("nan"), float("nan")
    texts.pop(1)
    lengths.pop(1)
    qkv = torch.randn(len(caches), 3, H, D)
    starts = list(range(len(caches)))
    pasts = [kv.length for kv in caches]
    (g,) = slab_groups(caches, pasts, starts, H, D, torch.float32, range(len(caches)))
    assert g.rel is not None and g.width == 128
    z = torch.full((len(caches), H, D), float("nan"))
    attend_rows(qkv, 0, g, z)
    for i, kv in enumerate(caches):
        alone_z = torch.full((1, H, D), float("nan"))
        (g1,) = slab_groups([kv], [pasts[i]], [0], H, D, torch.float32, [0])
        attend_rows(qkv[i:i + 1], 0, g1, alone_z)
        assert torch.equal(alone_z[0], z[i])
        k, v = texts[i]
        keys, values = torch.cat([k, qkv[i, 1][:, None]], 1), torch.cat([v, qkv[i, 2][:, None]], 1)
        torch.testing.assert_close(z[i].double(), _attention_f64(qkv[i, 0], keys, values), atol=1e-5, rtol=0)
        kv.length += 1
        assert torch.equal(kv.keys(0)[0], keys) and torch.equal(kv.values(0)[0], values)


def test_a_cache_in_a_slab_grows_copies_rewinds_and_gives_its_row_back():
    torch.manual_seed(3)
    gc.collect()  # caches of earlier tests that only the collector frees give their rows back now, not inside this test
    before = SLABS.count()
    kv = KVCache(2)
    k = torch.randn(1, 3, 50, 8)
    for layer in range(2):
        kv.append(layer, k, -k)
    kv.length = 50
    assert kv.slab.capacity == 64 and kv.nbytes == 2 * 2 * 3 * 64 * 8 * 4
    # the tail of the bucket holds zeros (finite values for the masked positions `attend_rows` multiplies by 0)
    assert torch.equal(kv._k[1][0, :, 50:64], torch.zeros(3, 14, 8))
    more = torch.randn(1, 3, 30, 8)
    for layer in range(2):
        kv.append(layer, more, -more)
    kv.length = 80
    assert kv.slab.capacity == 128 and torch.equal(kv.keys(1), torch.cat([k, more], 2))
    copy = KVCache(2)
    copy.copy_from(kv, 60)
    assert copy.slab is not None and (copy.slab, copy.row) != (kv.slab, kv.row)
    assert torch.equal(copy.values(0), -torch.cat([k, more], 2)[:, :, :60])
    kv.truncate(55)
    assert torch.equal(kv._v[0][0, :, 55:64], torch.zeros(3, 9, 8))  # rewound positions of the bucket zeroed
    assert torch.equal(copy.keys(0), torch.cat([k, more], 2)[:, :, :60])  # no storage shared
    del kv, copy
    gc.collect()
    # every row is free again; the free slabs of the capacity texts last started at are kept as spares, the others go
    assert SLABS.count() <= before + 2
    assert all(len(s.free) == SLAB_ROWS for s in SLABS._slabs.get((2, 3, 64, 8, torch.float32), []) + SLABS._slabs.get((2, 3, 128, 8, torch.float32), []))
    assert SLABS.start_key == (2, 3, 64, 8, torch.float32)  # the copy started at 64 positions' capacity
    SLABS.warm()  # what the idle server does: only `start_key`'s spares stay
    assert not SLABS._slabs.get((2, 3, 128, 8, torch.float32)) and SLABS._warm_rows(SLABS.start_key) == SPARE_ROWS
    with SLABS._lock:  # leave no spares of this shape behind
        del SLABS._slabs[SLABS.start_key]
    SLABS.start_key = None


def test_free_slabs_are_kept_for_the_next_texts_and_warm_writes_them():
    """A class's caches fill slabs partly in use first, then spare ones; a slab whose rows are all free stays while the
    capacity texts start at has fewer than `SPARE_ROWS` free rows already written (others go), and `warm` (the idle
    server) writes the free rows never written and makes new slabs, written, up to `SPARE_ROWS`."""
    gc.collect()
    start, grown = (2, 5, 64, 4, torch.float32), (2, 5, 128, 4, torch.float32)  # a shape no other test uses
    def cache(n):
        kv = KVCache(2)
        for layer in range(2):
            kv.append(layer, torch.ones(1, 5, n, 4), torch.ones(1, 5, n, 4))
        kv.length = n
        return kv
    caches = [cache(10) for _ in range(SLAB_ROWS + 4)]
    assert SLABS.start_key == start
    assert {(kv.slab is caches[0].slab, kv.row) for kv in caches[:SLAB_ROWS]} == {(True, r) for r in range(SLAB_ROWS)}
    assert [kv.row for kv in caches[SLAB_ROWS:]] == [0, 1, 2, 3] and caches[-1].slab is not caches[0].slab
    first, second = caches[0].slab, caches[-1].slab
    del caches[:SLAB_ROWS]  # the first slab is all free: kept (the second's free rows were never written)
    gc.collect()
    assert SLABS._slabs[start] == [first, second]
    more = cache(10)  # a slab partly in use comes before a free one
    assert more.slab is second and more.row == 4
    del caches, more
    gc.collect()
    assert SLABS._slabs[start] == [first, second] and SLABS._warm_rows(start) == SLAB_ROWS + 5
    assert SLABS.warm() == SLAB_ROWS - 5  # the second slab's rows never handed out: written; enough rows then
    assert SLABS._warm_rows(start) == SPARE_ROWS and not second.cold and second.free == list(range(SLAB_ROWS))
    assert all(torch.count_nonzero(t[5:]) == 0 for t in second.k + second.v)
    long = cache(100)  # a text that starts longer: its capacity is where texts start now
    assert SLABS.start_key == grown
    del long
    gc.collect()
    assert SLABS.warm() == (SLAB_ROWS - 1) + SLAB_ROWS  # the other capacity's free slabs dropped; this one's made up
    assert not SLABS._slabs.get(start)
    kept, made = SLABS._slabs[grown]
    assert kept.free == made.free == list(range(SLAB_ROWS)) and not kept.cold and not made.cold
    assert all(torch.count_nonzero(t) == 0 for t in made.k + made.v)  # written: resident (test_memory counts the faults)
    SLABS.warm(start)  # `key` counts only before any text started
    assert SLABS.start_key == grown and not SLABS._slabs.get(start)
    with SLABS._lock:  # leave no spares of this shape behind
        del SLABS._slabs[grown]
    SLABS.start_key = None


def test_a_row_handed_back_while_the_slabs_lock_is_held_waits_instead_of_deadlocking():
    """A cache's finalizer runs wherever the collector does: also on a thread inside `_Slabs`' locked sections (an
    allocation there started a collection). Its row is queued and settled once the lock is free, not waited for."""
    kv = KVCache(2)
    for layer in range(2):
        kv.append(layer, torch.ones(1, 7, 3, 4), torch.ones(1, 7, 3, 4))
    slab, row = kv.slab, kv.row
    kv._release.detach()  # hand the row back by hand, as the finalizer would
    done = threading.Event()

    def finalizer_inside_the_lock():
        with SLABS._lock:
            SLABS.give_back(slab, row)
            assert row not in slab.free  # queued
        done.set()

    worker = threading.Thread(target=finalizer_inside_the_lock, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert done.is_set()
    SLABS.count()  # the next use of the slabs settles it
    assert row in slab.free
    with SLABS._lock:  # leave nothing of this shape behind
        SLABS._slabs.pop(slab.key, None)
    SLABS.start_key = None


def test_the_idle_hook_waits_for_a_quiet_spell_and_runs_once_a_minute_under_load(monkeypatch):
    """`on_idle(True)` once the queue has been empty for `idle_after` seconds (not at once: the next request needs the
    memory a trim would hand back), once per quiet spell; `on_idle(False)` every minute while the loop is busy."""
    calls = []
    engine = Engine(on_idle=calls.append, idle_after=0.4)
    engine.call(None, None, lambda: 1)
    time.sleep(0.2)
    assert calls == []
    engine.call(None, None, lambda: 2)  # work again: the quiet spell starts over
    time.sleep(0.25)
    assert calls == []
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.02)
    assert calls == [True]
    time.sleep(0.8)
    assert calls == [True]  # once a quiet spell
    clock = [time.monotonic()]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    clock[0] += 61  # a minute of passes later
    engine.call(None, None, lambda: 3)
    assert calls == [True, False]
