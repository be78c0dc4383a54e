"""Step-wise generation, forcing, rewinding and traces, against transformers and against each other."""

import numpy as np
import pytest
import torch

from gpt2viz import ContextLengthError, GenerationSession, SamplingConfig, TraceBudgetError, generate, trace
from gpt2viz.tokenizer import ENDOFTEXT_ID

PROMPT = "The quick brown fox"


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_equals_transformers_generate(hf_checkpoints, small_model, tokenizer, penalty):
    hf_model = hf_checkpoints["small"][0]
    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        ref = hf_model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
            max_new_tokens=30, repetition_penalty=penalty, pad_token_id=ENDOFTEXT_ID,
        )[0, len(ids):].tolist()
    cfg = SamplingConfig(temperature=0, repetition_penalty=penalty, max_new_tokens=30, stop_at_eos=False)
    ours = [s.token_id for s in generate(small_model, tokenizer, PROMPT, cfg)]
    assert ours == ref
    assert len(ours) == 30


def test_step_fields_are_consistent(small_model, tokenizer):
    cfg = SamplingConfig(temperature=0.9, top_k=20, seed=5, max_new_tokens=6)
    steps = list(generate(small_model, tokenizer, PROMPT, cfg, top_n=12))
    assert [s.index for s in steps] == list(range(6))
    assert steps[-1].finish_reason == "max_new_tokens"
    n_prompt = len(tokenizer.encode(PROMPT))
    for s in steps:
        assert s.position == n_prompt - 1 + s.index
        assert s.method == "sampled"
        assert len(s.candidates) >= 12
        chosen = [c for c in s.candidates if c.token_id == s.token_id]
        assert len(chosen) == 1 and chosen[0].prob_final == pytest.approx(s.prob_final)
        assert s.prob_final > 0 and 1 <= s.rank_final <= 20
        assert sum(c.prob_final > 0 for c in s.candidates) <= 20 + 1
        assert s.entropy_final < s.entropy  # top-k and temperature < 1 sharpen it
        L, H = small_model.cfg.n_layer, small_model.cfg.n_head
        assert s.attention.shape == (L, H, s.position + 1) and s.attention.dtype == np.float16
        assert s.resid.shape == (L + 1, small_model.cfg.n_embd)
        assert s.lens_ids.shape == s.lens_probs.shape == (L + 1, 12)
        # The last lens row is the model's own next-token distribution.
        top_raw = max(s.candidates, key=lambda c: c.prob)
        assert s.lens_ids[-1, 0] == top_raw.token_id
        assert float(s.lens_probs[-1, 0]) == pytest.approx(top_raw.prob, abs=1e-3)
    assert steps[-1].text == tokenizer.decode(tokenizer.encode(PROMPT) + [s.token_id for s in steps])


def test_step_captures_equal_the_trace_of_the_final_sequence(small_model, tokenizer):
    session = GenerationSession(small_model, tokenizer, PROMPT, SamplingConfig(seed=2, max_new_tokens=12))
    steps = list(session.run())
    tr = trace(small_model, tokenizer, session.ids, top_n=10)
    assert len(tr) == len(session.ids)
    for s in steps:
        p = s.position
        # steps keep float16 rows; traces keep 8-bit codes (within 1/510)
        np.testing.assert_allclose(s.attention.astype(np.float32), tr.attention_row(p), atol=1 / 510 + 1e-3)
        np.testing.assert_allclose(s.resid.astype(np.float32), tr.resid[:, p].astype(np.float32), atol=2e-3, rtol=2e-3)
        np.testing.assert_array_equal(s.lens_ids, tr.lens_ids[:, p])
        np.testing.assert_allclose(s.lens_probs.astype(np.float32), tr.lens_probs[:, p].astype(np.float32), atol=2e-3)
        # The probability the trace gives the chosen token is the raw probability the step reported.
        assert np.exp(tr.logprobs[p + 1]) == pytest.approx(s.prob, rel=1e-3, abs=1e-7)


def test_trace_against_transformers(hf_checkpoints, small_model, tokenizer):
    hf_model = hf_checkpoints["small"][0]
    text = "To be, or not to be, that is the question:"
    tr = trace(small_model, tokenizer, text, top_n=10)
    ids = tokenizer.encode(text)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    logp = torch.log_softmax(ref.logits[0], -1)
    expected = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    assert np.isnan(tr.logprobs[0])
    np.testing.assert_allclose(tr.logprobs[1:], expected, atol=1e-4)
    np.testing.assert_allclose(tr.surprisal[1:], -expected, atol=1e-4)
    np.testing.assert_array_equal(tr.top_ids[:, 0], ref.logits[0].argmax(-1).numpy())
    attn = torch.stack(ref.attentions)[:, 0].numpy()  # [layer, head, query, key]
    np.testing.assert_allclose(tr.attention, attn, atol=1 / 510 + 1e-5)  # 8-bit codes: p rounded to k/255
    np.testing.assert_allclose(tr.pattern(1, 2), attn[1, 2], atol=1 / 510 + 1e-5)
    assert np.abs(tr.attention - attn).max() > 1e-4  # it is the 8-bit store being read, not a float copy
    for layer in range(small_model.cfg.n_layer):
        np.testing.assert_allclose(tr.resid[layer].astype(np.float32), ref.hidden_states[layer][0].numpy(), atol=5e-3, rtol=5e-3)
    np.testing.assert_allclose(tr.embed.astype(np.float32) + tr.pos_embed.astype(np.float32), ref.hidden_states[0][0].numpy(), atol=5e-3)
    assert tr.token_strings[:3] == ["To", " be", ","]
    assert tr.attention_packed.dtype == np.uint8 and tr.resid.dtype == np.float16


def test_forcing_any_token(small_model, tokenizer):
    session = GenerationSession(small_model, tokenizer, PROMPT, SamplingConfig(seed=1))
    first = session.step()
    forced_id = tokenizer.encode(" zebra")[0]
    forced = session.step(force=forced_id)
    assert forced.method == "forced" and forced.token_id == forced_id
    assert session.ids[-2:] == [first.token_id, forced_id]
    tr = trace(small_model, tokenizer, session.ids)
    assert np.exp(tr.logprobs[-1]) == pytest.approx(forced.prob, rel=1e-3, abs=1e-7)
    with pytest.raises(ValueError, match=r"forced token id must be an integer in \[0, 50257\)"):
        session.step(force=50257)
    with pytest.raises(ValueError, match="forced token id"):
        session.step(force="cat")
    assert len(session.steps) == 2  # a refused step changes nothing


def test_rewinding_replays_bit_for_bit_and_branches(small_model, tokenizer):
    cfg = SamplingConfig(seed=42, temperature=1.0, top_p=0.95, max_new_tokens=12)
    reference = list(generate(small_model, tokenizer, PROMPT, cfg))
    ref_tokens = [s.token_id for s in reference]

    session = GenerationSession(small_model, tokenizer, PROMPT, cfg)
    list(session.run())
    for keep in (5, 0, 11):
        session.rewind(keep)
        assert len(session.steps) == keep
        replay = list(session.run(max_new_tokens=12 - keep))
        assert [s.token_id for s in session.steps] == ref_tokens
        for a, b in zip(replay, reference[keep:]):
            assert a.prob == b.prob and a.prob_final == b.prob_final  # bit for bit
            np.testing.assert_array_equal(a.attention, b.attention)

    # Branch: rewind to 4, force another token, continue; a fresh run with the same choice agrees.
    session.rewind(4)
    other = (ref_tokens[4] + 1) % 50257
    session.step(force=other)
    branch = [s.token_id for s in session.run(max_new_tokens=7)]
    fresh = [s.token_id for s in generate(small_model, tokenizer, PROMPT, cfg, force={4: other})]
    assert fresh == ref_tokens[:4] + [other] + branch
    with pytest.raises(ValueError, match="can rewind to 0..12"):
        session.rewind(13)


def test_generation_stops_at_the_context_limit(small_model, tokenizer):
    n_ctx = small_model.cfg.n_positions
    prompt = list(range(1000, 1000 + n_ctx - 3))
    steps = list(generate(small_model, tokenizer, prompt, SamplingConfig(max_new_tokens=10, stop_at_eos=False)))
    assert len(steps) == 3
    assert steps[-1].finish_reason == "context"
    assert f"context of {n_ctx} tokens" in steps[-1].message
    session = GenerationSession(small_model, tokenizer, prompt, SamplingConfig())
    for _ in range(3):
        session.step()
    with pytest.raises(ContextLengthError, match="reached the model's context"):
        session.step()
    with pytest.raises(ContextLengthError, match=f"prompt has {n_ctx} tokens"):
        GenerationSession(small_model, tokenizer, list(range(n_ctx)), SamplingConfig())
    with pytest.raises(ContextLengthError):
        trace(small_model, tokenizer, list(range(n_ctx + 1)))


def test_eos_stops_generation(small_model, tokenizer):
    steps = list(generate(small_model, tokenizer, PROMPT, SamplingConfig(max_new_tokens=5), force={1: ENDOFTEXT_ID}))
    assert len(steps) == 2 and steps[-1].finish_reason == "eos"
    steps = list(generate(small_model, tokenizer, PROMPT, SamplingConfig(max_new_tokens=5, stop_at_eos=False), force={1: ENDOFTEXT_ID}))
    assert len(steps) == 5


def test_text_is_decoded_across_a_multi_token_character(small_model, tokenizer):
    robot = tokenizer.encode("🤖")
    assert len(robot) == 3  # one character, three tokens
    session = GenerationSession(small_model, tokenizer, "Robot:", SamplingConfig())
    texts = [session.step(force=t).text for t in robot]
    assert texts[0] == texts[1] == "Robot:"  # incomplete character held back, no replacement chars
    assert texts[2] == "Robot:🤖"
    assert all("\ufffd" not in t for t in texts)


def test_bad_prompts(small_model, tokenizer):
    with pytest.raises(ValueError, match="prompt is empty"):
        GenerationSession(small_model, tokenizer, "", SamplingConfig())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        GenerationSession(small_model, tokenizer, [5, 99999], SamplingConfig())
    with pytest.raises(ValueError, match="top_n"):
        GenerationSession(small_model, tokenizer, "hi", SamplingConfig(), top_n=3)
    with pytest.raises(ValueError, match="text is empty"):
        trace(small_model, tokenizer, "")


def test_trace_memory_budget(small_model, tokenizer):
    text = "word " * 40
    small = trace(small_model, tokenizer, text)
    assert 0 < small.nbytes
    with pytest.raises(TraceBudgetError, match=r"needs about .* MiB, over the budget of"):
        trace(small_model, tokenizer, text, max_bytes=small.nbytes // 2)


def test_recording_session_keeps_every_position_like_a_trace(small_model, tokenizer):
    session = GenerationSession(small_model, tokenizer, PROMPT, SamplingConfig(seed=4, max_new_tokens=8), record=True)
    list(session.run())
    session.rewind(5)
    list(session.run(max_new_tokens=3))
    rec = session.records
    ids = session.ids
    assert len(rec) == len(ids) - 1  # the last token has not been read yet
    assert len(rec.logprobs) == len(ids)
    tr = trace(small_model, tokenizer, ids)
    for p in range(len(rec)):
        np.testing.assert_allclose(session.attention_row(p), tr.attention_row(p), atol=1 / 510 + 1e-5)
        np.testing.assert_allclose(rec.resid[p], tr.resid[:, p].astype(np.float32), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(rec.embed[p] + rec.pos_embed[p], tr.resid[0, p].astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(np.array(rec.logprobs[1:]), tr.logprobs[1:], atol=1e-4)
    session.rewind(0)
    assert len(rec) == 0 and rec.logprobs == []
    session.step()
    assert len(rec) == len(tokenizer.encode(PROMPT)) and len(rec.logprobs) == len(session.ids)


def test_peek_shows_the_next_distribution_without_choosing(small_model, tokenizer):
    cfg = SamplingConfig(seed=8, temperature=0.7, top_k=5)
    session = GenerationSession(small_model, tokenizer, PROMPT, cfg)
    before = session.peek()
    assert session.ids == tokenizer.encode(PROMPT) and before.position == len(session.ids) - 1
    assert sum(c.prob_final > 0 for c in before.candidates) == 5
    step = session.step()  # reuses the pass that peek made
    assert [c.token_id for c in step.candidates][:5] == [c.token_id for c in before.candidates][:5]
    fresh = next(generate(small_model, tokenizer, PROMPT, cfg))
    assert fresh.token_id == step.token_id and fresh.prob == step.prob
    session.config = SamplingConfig(temperature=0)  # controls can change between steps
    greedy = session.peek()
    assert [c.prob_final for c in greedy.candidates].count(1.0) == 1


def test_attention_codes_are_within_half_a_step_of_the_probabilities():
    from gpt2viz.capture import dequantize_attention, quantize_attention

    p = torch.softmax(torch.randn(4, 50, 50) * 3, dim=-1)
    p = torch.cat([p.flatten(), torch.tensor([0.0, 1.0, 0.5 / 255, 254.5 / 255])])
    codes = quantize_attention(p)
    assert codes.dtype == torch.uint8 and codes[-4:-2].tolist() == [0, 255]
    back = dequantize_attention(codes.numpy())
    assert np.abs(back - p.numpy()).max() <= 1 / 510 + 1e-7


def test_attention_pattern_refuses_what_it_cannot_show(small_model, tokenizer):
    plain = GenerationSession(small_model, tokenizer, PROMPT)
    plain.step()
    with pytest.raises(ValueError, match="needs a recording session"):
        plain.attention_pattern(0, 0, 2)
    session = GenerationSession(small_model, tokenizer, PROMPT, record=True)
    session.step()
    n = len(session.records)
    assert session.attention_pattern(1, 0, n).shape == (small_model.cfg.n_head, n, n)
    for bad in [(0, n, n + 1), (0, 3, 3), (0, -1, 2)]:
        with pytest.raises(ValueError, match=r"0 <= start < end <= "):
            session.attention_pattern(*bad)
    with pytest.raises(ValueError, match="layer must be in"):
        session.attention_pattern(small_model.cfg.n_layer, 0, 2)


def hf_logit_lens(hf_model, ids: list[int], top_n: int):
    """transformers' hidden states through its final layer norm and head: top-n ids and probs `[layer + 1, pos, n]`."""
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids]), output_hidden_states=True)
        # hidden_states[-1] already went through ln_f in transformers; the earlier ones did not
        hidden = [hf_model.transformer.ln_f(h[0]) for h in ref.hidden_states[:-1]] + [ref.hidden_states[-1][0]]
        top = torch.topk(torch.softmax(torch.stack([hf_model.lm_head(h) for h in hidden]), dim=-1), top_n, dim=-1)
    return top.indices.numpy(), top.values.numpy()


def test_recording_session_logit_lens_is_transformers_hidden_states_through_the_head(hf_checkpoints, small_model, tokenizer):
    hf_model = hf_checkpoints["small"][0]
    session = GenerationSession(small_model, tokenizer, PROMPT, SamplingConfig(seed=3, max_new_tokens=5), record=True)
    steps = list(session.run())
    assert all(s.attention is None and s.lens_ids is None and s.lens_probs is None for s in steps)  # recomputed on demand
    n = len(session.records)
    ids, probs = session.logit_lens(0, n, top_n=4)
    assert ids.shape == probs.shape == (small_model.cfg.n_layer + 1, n, 4)
    ref_ids, ref_probs = hf_logit_lens(hf_model, session.ids[:n], 4)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(probs, ref_probs, atol=1e-5)
    # the last row is the model's own next-token distribution, as the steps reported it
    for s in steps:
        assert ids[-1, s.position, 0] == max(s.candidates, key=lambda c: c.prob).token_id
    # positions once read are kept; after a rewind and a different continuation they are still right
    assert len(session.records.lens) == n
    session.rewind(2)
    assert sorted(session.records.lens) == list(range(len(session.records)))
    session.step(force=(session.ids[-1] + 7) % 50257)
    list(session.run(max_new_tokens=3))
    n = len(session.records)
    ids, probs = session.logit_lens(0, n, top_n=2)
    ref_ids, ref_probs = hf_logit_lens(hf_model, session.ids[:n], 2)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(probs, ref_probs, atol=1e-5)
    big_ids, _ = session.logit_lens(n - 1, n, top_n=40)  # more than is kept: read afresh
    np.testing.assert_array_equal(big_ids[:, 0, :2], ids[:, -1])
    with pytest.raises(ValueError, match=r"0 <= start < end"):
        session.logit_lens(2, 2)
    with pytest.raises(ValueError, match="top_n"):
        session.logit_lens(0, 1, top_n=0)
    with pytest.raises(ValueError, match="needs a recording session"):
        GenerationSession(small_model, tokenizer, PROMPT).logit_lens(0, 1)


def test_unembedded_blocks_cover_every_row_once_across_chunk_boundaries(small_model):
    from gpt2viz.capture import unembedded_blocks

    normed = torch.randn(23, small_model.cfg.n_embd)
    expected = normed @ small_model.wte.weight.detach().T
    seen = torch.full_like(expected, float("nan"))
    for start, logits in unembedded_blocks(small_model, normed, chunk=10, block=4):
        assert logits.shape[0] <= 4
        assert torch.isnan(seen[start:start + logits.shape[0]]).all()  # no row handed out twice
        seen[start:start + logits.shape[0]] = logits
    torch.testing.assert_close(seen, expected, atol=1e-5, rtol=1e-5)


def resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_reducing_many_blocks_of_logits_does_not_grow_the_process():
    """The lens and the log-probabilities reduce 50k-wide blocks of logits and keep small results;
    a fresh softmax per block fragmented the heap (the process grew by rows x vocab x 4 bytes:
    5 GB for the lens of a 1024-token gpt2-medium trace). They reduce in place instead."""
    from gpt2viz import GPT2, GPT2Config
    from gpt2viz.capture import logsumexp_, top_probabilities_, unembedded_blocks
    from gpt2viz.model import init_weights

    logits = torch.randn(3, 50257) * 4
    expected = torch.logsumexp(logits, dim=-1)
    torch.testing.assert_close(logsumexp_(logits.clone()), expected)
    ids, probs = top_probabilities_(logits.clone(), 4)
    top = torch.topk(torch.softmax(logits, dim=-1), 4, dim=-1)
    torch.testing.assert_close(probs, top.values)
    assert torch.equal(ids, top.indices)

    model = init_weights(GPT2(GPT2Config(n_layer=1, n_head=12, n_embd=768))).eval()  # gpt2's width
    with torch.no_grad():
        model.unembed(torch.zeros(1, 768))  # the one-time transposed unembedding copy
    rows = torch.randn(4096, 768)
    before = resident_bytes()
    kept = [top_probabilities_(logits, 10) for _, logits in unembedded_blocks(model, rows)]
    grown = resident_bytes() - before
    assert sum(ids.shape[0] for ids, _ in kept) == 4096
    assert grown < 4096 * 50257 * 4 / 8, f"the process grew by {grown / 2**20:.0f} MiB reducing 4096 rows"


def test_candidates_hold_every_stage_of_the_independent_pipeline_in_order(hf_checkpoints, small_model, tokenizer):
    """Each candidate's four numbers against transformers' logits put through each stage by hand."""
    hf_model = hf_checkpoints["small"][0]
    cfg = SamplingConfig(temperature=0.7, top_k=12, seed=3)
    session = GenerationSession(small_model, tokenizer, PROMPT, cfg, top_n=10)
    step = session.step()
    with torch.no_grad():
        logits = hf_model(torch.tensor([session.ids[:-1]])).logits[0, -1].double()
    probs, tempered = torch.softmax(logits, 0), torch.softmax(logits / 0.7, 0)
    kth = torch.topk(logits, 12).values[-1]
    final = torch.softmax((logits / 0.7).masked_fill(logits < kth, float("-inf")), 0)
    assert [c.token_id for c in step.candidates][:10] == torch.topk(logits, 10).indices.tolist()  # likeliest first
    for c in step.candidates:
        assert c.logit == pytest.approx(float(logits[c.token_id]), abs=1e-4)
        assert (c.prob, c.prob_temperature, c.prob_final) == pytest.approx(
            (float(probs[c.token_id]), float(tempered[c.token_id]), float(final[c.token_id])), abs=1e-5)
    assert any(c.token_id == step.token_id for c in step.candidates)


def test_a_sessions_record_bytes_are_the_sum_over_every_array_it_holds(small_model, tokenizer):
    session = GenerationSession(small_model, tokenizer, PROMPT, SamplingConfig(seed=4), record=True)
    for _ in range(5):
        session.step()
    session.read()
    session.logit_lens(2, 7)  # lens entries are held too
    r = session.records
    walked = (sum(a.nbytes for rows in (r.resid, r.embed, r.pos_embed) for a in rows)
              + sum(ids.nbytes + probs.nbytes for ids, probs in r.lens.values()))
    assert r.lens and r.nbytes == walked > 0
    session.rewind(2)
    r = session.records
    assert r.nbytes == sum(a.nbytes for rows in (r.resid, r.embed, r.pos_embed) for a in rows) + sum(
        ids.nbytes + probs.nbytes for ids, probs in r.lens.values())


STEP_CONFIGS = [SamplingConfig(seed=1), SamplingConfig(temperature=0), SamplingConfig(temperature=0.7, top_k=20, seed=5),
                SamplingConfig(top_p=0.8, seed=2), SamplingConfig(repetition_penalty=1.5, seed=9), SamplingConfig(temperature=1.3, seed=11),
                SamplingConfig(top_k=3, temperature=0.5, repetition_penalty=1.2, seed=4), SamplingConfig(seed=123)]
STEP_FIELDS = ("index", "position", "token_id", "token_text", "text", "method", "prob", "rank", "prob_final", "rank_final",
               "entropy", "entropy_final", "candidates", "finish_reason")


def test_sessions_stepped_together_take_each_the_token_and_numbers_of_its_own_sampler(small_model, tokenizer):
    """`step_together` (the engine's batched sampler) against the sampler's first body, row by row: the stages by
    `distributions` on the row alone, the draw as an inverse CDF in numpy, ranks, entropy and the candidates in
    numpy; and every field of every Step equal to what the same session stepped alone gets."""
    from gpt2viz.generation import read_together, step_together
    from gpt2viz.sampling import distributions, uniform

    prompts = ["The quick brown fox", "Hello", "In the beginning God created", "A B C D E", "x", "Shall I compare thee", "1 2 3", "Paris is"]
    together = [GenerationSession(small_model, tokenizer, p, c, top_n=10 if i % 3 else 25, record=True)
                for i, (p, c) in enumerate(zip(prompts, STEP_CONFIGS))]
    alone = [GenerationSession(small_model, tokenizer, p, c, top_n=s.top_n, record=True) for p, c, s in zip(prompts, STEP_CONFIGS, together)]
    for k in range(6):
        forces = [None] * 8
        forces[k] = 318  # one forced token in each batch
        read_together(together)
        pendings = [s._pending for s in together]
        expected = []
        for s, pending, force in zip(together, pendings, forces):
            d = distributions(pending.logits, s.ids, s.config)
            p, final = d.probs.double().numpy(), d.probs_final.double().numpy()
            if force is not None:
                token = force
            elif s.config.greedy:
                token = int(np.argmax(final))
            else:
                cdf = np.cumsum(final)
                token = int(np.searchsorted(cdf, uniform(s.config.seed, pending.position + 1) * cdf[-1], side="right"))
            top = set(np.argsort(-p, kind="stable")[:s.top_n].tolist()) | set(np.flatnonzero(final >= np.sort(final)[-s.top_n]).tolist()) | {token}
            nz = p[p > 0]
            expected.append((token, p[token], int((p > p[token]).sum()) + 1, int((final > final[token]).sum()) + 1,
                             float(-(nz * np.log(nz)).sum()), top))
        steps = step_together(together, forces)
        for st, (token, prob, rank, rank_final, ent, top) in zip(steps, expected):
            assert st.token_id == token and st.prob == float(np.float32(prob)) and (st.rank, st.rank_final) == (rank, rank_final)
            assert st.entropy == pytest.approx(ent, rel=1e-6)  # entr in float32, summed in float64
            assert {c.token_id for c in st.candidates} <= top and st.token_id in {c.token_id for c in st.candidates}
        assert [st.method for st in steps] == [("forced" if f is not None else "greedy" if s.config.greedy else "sampled")
                                               for s, f in zip(together, forces)]
        for s, st, force in zip(alone, steps, forces):
            read_together([s])  # the engine's pass for a session alone
            solo = s.step(force=force)
            for name in STEP_FIELDS:
                assert getattr(solo, name) == getattr(st, name), name
    for s, t in zip(alone, together):
        assert s.records.logprobs[1:] == t.records.logprobs[1:]  # [0] is NaN: no token before the first


def test_a_sessions_size_counts_its_steps_about_as_much_as_they_hold(small_model, tokenizer):
    """The session store's budget counts every step's row and candidates (26 KB a token for gpt2), not only
    the KV cache and records; measured here by what a copy of the steps allocates."""
    import copy
    import gc
    import tracemalloc

    from gpt2viz.generation import step_nbytes

    s = GenerationSession(small_model, tokenizer, PROMPT, SamplingConfig(seed=3, stop_at_eos=False), record=True)
    before = s.nbytes
    for _ in range(40):
        s.step()
    counted = sum(step_nbytes(st) for st in s.steps)
    assert s.nbytes - before >= counted > 0
    gc.collect()
    tracemalloc.start()
    try:
        held = copy.deepcopy(s.steps)
        measured = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert 0.6 * measured < counted < 1.6 * measured, (counted, measured)
    del held
    kept = s.steps[:10]
    s.rewind(10)
    assert s.nbytes == s._kv.nbytes + s.capture.nbytes + sum(step_nbytes(st) for st in kept)
