"""Interventions (gpt2viz/interventions.py) against the same edits made by hand in transformers' GPT-2,
on every forward body: the module path, the flat decode step and the engine's ragged pass."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from gpt2viz import GenerationSession, SamplingConfig, load_model
from gpt2viz.interventions import (
    REFERENCE_TEXT, AblateAttn, AblateHeads, AblateMLP, AblateNeurons, AddVector, InterventionError, Patch, ScaleHead, Steer,
    from_dict, resolve, to_dict,
)

TEXT = "The old lighthouse keeper climbed the stairs every night to light the lamp"
SOURCE = "A quiet fox walked across the frozen river before the sun came up over hills"


# --- the same edits, by hand, on transformers' modules ---------------------------------------------

@contextlib.contextmanager
def hf_hooks(hf, edits):
    """edits: list of (where, layer, fn) with where in
    'z' (fn on the merged heads `[B, T, C]` entering attn.c_proj), 'attn_out', 'mlp_out',
    'mlp_post' (the GELU output entering mlp.c_proj), 'resid_pre' (the block's input)."""
    handles = []
    for where, layer, fn in edits:
        block = hf.transformer.h[layer]
        if where in ("z", "mlp_post"):
            module = block.attn.c_proj if where == "z" else block.mlp.c_proj
            handles.append(module.register_forward_pre_hook(lambda m, args, fn=fn: (fn(args[0].clone()),) + args[1:]))
        elif where in ("attn_out", "mlp_out"):
            module = block.attn.c_proj if where == "attn_out" else block.mlp
            handles.append(module.register_forward_hook(lambda m, args, out, fn=fn: fn(out.clone())))
        elif where == "resid_pre":
            def pre(m, args, kwargs, fn=fn):
                if args:
                    return (fn(args[0].clone()),) + args[1:], kwargs
                return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"].clone())}
            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def hf_logits(hf, ids, edits=()):
    with torch.no_grad(), hf_hooks(hf, edits):
        return hf(torch.tensor([ids])).logits[0].float()


def hf_capture(hf, ids, where, layer):
    """The activation at (where, layer) in an unmodified run, batch item 0."""
    seen = {}

    def keep(x):
        seen["x"] = x.clone()
        return x
    hf_logits(hf, ids, [(where, layer, keep)])
    return seen["x"][0]


def by_hand(hf, tok, iv, d_head):
    """The transformers edits that make `iv`."""
    if isinstance(iv, AblateHeads):
        cols = torch.cat([torch.arange(h * d_head, (h + 1) * d_head) for h in iv.heads])
        if iv.mode == "zero":
            return [("z", iv.layer, lambda x: x.index_fill_(-1, cols, 0.0))]
        mean = hf_capture(hf, tok.encode(REFERENCE_TEXT)[:hf.config.n_positions], "z", iv.layer).mean(0)

        def set_mean(x):
            x[..., cols] = mean[cols]
            return x
        return [("z", iv.layer, set_mean)]
    if isinstance(iv, ScaleHead):
        cols = slice(iv.head * d_head, (iv.head + 1) * d_head)

        def scale(x):
            x[..., cols] *= iv.factor
            return x
        return [("z", iv.layer, scale)]
    if isinstance(iv, (AblateAttn, AblateMLP)):
        where = "attn_out" if isinstance(iv, AblateAttn) else "mlp_out"
        value = 0.0 if iv.mode == "zero" else hf_capture(hf, tok.encode(REFERENCE_TEXT)[:hf.config.n_positions], where, iv.layer).mean(0)

        def put(x):
            x[...] = value
            return x
        return [(where, iv.layer, put)]
    if isinstance(iv, AblateNeurons):
        idx = torch.tensor(iv.neurons)
        mean = hf_capture(hf, tok.encode(REFERENCE_TEXT)[:hf.config.n_positions], "mlp_post", iv.layer).mean(0)

        def neurons(x):
            x[..., idx] = 0.0 if iv.mode == "zero" else mean[idx]
            return x
        return [("mlp_post", iv.layer, neurons)]
    if isinstance(iv, Patch):
        _, layer, short = iv.hook.split(".")
        assert short == "resid_pre"
        src = hf_capture(hf, tok.encode(iv.source), "resid_pre", int(layer))
        positions = list(iv.positions) if iv.positions is not None else list(range(len(src)))

        def patch(x):
            for p in positions:
                if p < x.shape[1]:
                    x[0, p] = src[p]
            return x
        return [("resid_pre", int(layer), patch)]
    if isinstance(iv, Steer):
        plus = hf_capture(hf, tok.encode(iv.plus), "resid_pre", iv.layer).mean(0)
        minus = hf_capture(hf, tok.encode(iv.minus), "resid_pre", iv.layer).mean(0)
        return [("resid_pre", iv.layer, lambda x: x + iv.scale * (plus - minus))]
    if isinstance(iv, AddVector):
        vec = torch.tensor(iv.vector)
        return [("resid_pre", iv.layer, lambda x: x + iv.scale * vec)]
    raise AssertionError(iv)


CASES = [
    [AblateHeads(layer=1, heads=(0, 2))],
    [AblateHeads(layer=2, heads=(3,), mode="mean")],
    [ScaleHead(layer=0, head=1, factor=-1.5)],
    [AblateAttn(layer=1)],
    [AblateAttn(layer=0, mode="mean")],
    [AblateMLP(layer=2)],
    [AblateMLP(layer=1, mode="mean")],
    [AblateNeurons(layer=0, neurons=(3, 100, 511))],
    [AblateNeurons(layer=2, neurons=(7,), mode="mean")],
    [Patch(hook="blocks.1.resid_pre", source=SOURCE, positions=(2, 5, 6))],
    [Patch(hook="blocks.0.resid_pre", source="short source")],
    [Steer(layer=2, plus="Love and joy", minus="Hate and fear", scale=3.0)],
    [Steer(layer=0, plus="sea", minus="land")],
    [AddVector(layer=1, vector=tuple(np.linspace(-1, 1, 128).tolist()), scale=0.5)],
    # composed: they apply in order, at different places and at the same one
    [AblateHeads(layer=0, heads=(1,)), ScaleHead(layer=0, head=2, factor=2.0), AblateMLP(layer=1, mode="mean"),
     Steer(layer=2, plus="up", minus="down", scale=2.0)],
]


@pytest.fixture(scope="module")
def small(hf_checkpoints, tokenizer):
    hf, folder = hf_checkpoints["small"]
    return hf, load_model(folder), tokenizer


@pytest.mark.parametrize("ivs", CASES, ids=lambda ivs: "+".join(type(iv).__name__ for iv in ivs))
def test_each_intervention_equals_the_same_edit_by_hand_on_every_forward_body(small, ivs):
    hf, model, tok = small
    ids = tok.encode(TEXT)
    edits = [e for iv in ivs for e in by_hand(hf, tok, iv, model.cfg.d_head)]
    expected = hf_logits(hf, ids, edits)
    assert (expected - hf_logits(hf, ids)).abs().max() > 1e-3  # the edit changes something
    plan = resolve(ivs, model, tok)
    with torch.no_grad():
        # the module path, the whole text at once
        with model.hooks(plan.hooks(0)):
            whole = model(torch.tensor([ids]))[0].float()
        torch.testing.assert_close(whole, expected, atol=1e-4, rtol=1e-4)
        # a prompt, then the flat decode step one token at a time
        kv = model.new_kv_cache()
        rows = []
        for start, end in [(0, 4)] + [(p, p + 1) for p in range(4, len(ids))]:
            with model.hooks(plan.hooks(kv.length)):
                rows.append(model(torch.tensor([ids[start:end]]), kv_cache=kv)[0].float())
        torch.testing.assert_close(torch.cat(rows), expected, atol=1e-4, rtol=1e-4)
        # the engine's ragged pass, batched with an unmodified sequence, in chunks
        kv, other = model.new_kv_cache(), model.new_kv_cache()
        normed = []
        for start, end in [(0, 5), (5, 6), (6, len(ids))]:
            out = model.forward_ragged([torch.tensor(ids[start:end]), torch.tensor(ids[start:end])], [kv, other], [plan, None])
            normed.append(out.normed[out.rows(0)])
            plain = out.normed[out.rows(1)]
        torch.testing.assert_close(model.unembed_rows(torch.cat(normed)).float(), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.unembed_rows(plain).float(), hf_logits(hf, ids)[6:], atol=1e-4, rtol=1e-4)


def test_a_generation_with_interventions_records_the_changed_model(small):
    """Every step of a session with interventions, and its recorded views, are those of the edited model."""
    hf, model, tok = small
    ivs = [AblateHeads(layer=0, heads=(0, 1, 2)), AblateMLP(layer=1, mode="mean")]
    edits = [e for iv in ivs for e in by_hand(hf, tok, iv, model.cfg.d_head)]
    for record in (False, True):
        session = GenerationSession(model, tok, TEXT, SamplingConfig(temperature=0), record=record, interventions=ivs)
        steps = list(session.run(max_new_tokens=6))
        ids = session.ids
        logits = hf_logits(hf, ids, edits)
        greedy = logits[len(session.prompt_ids) - 1:-1].argmax(-1).tolist()
        assert [s.token_id for s in steps] == greedy
        for step in steps:
            top = step.candidates[0]
            assert top.logit == pytest.approx(float(logits[step.position, top.token_id]), abs=1e-4)
    with torch.no_grad(), hf_hooks(hf, edits):
        out = hf(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    session.read()
    for layer in range(model.cfg.n_layer):
        np.testing.assert_allclose(session.attention_pattern(layer, 0, len(ids)), out.attentions[layer][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(session.records.resid[len(ids) - 1][1], out.hidden_states[1][0, -1].numpy(), atol=1e-4)
    assert session.interventions == tuple(ivs)


def test_no_interventions_and_a_plan_that_changes_nothing_leave_the_model_as_it_is(small):
    _, model, tok = small
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        plain = model(ids)
        with model.hooks(resolve([], model, tok).hooks(0)):
            assert torch.equal(model(ids), plain)
        with model.hooks(resolve([ScaleHead(layer=1, head=0, factor=1.0)], model, tok).hooks(0)):
            assert torch.equal(model(ids), plain)


def test_interventions_round_trip_through_dicts_and_refuse_malformed_ones():
    for ivs in CASES:
        for iv in ivs:
            assert from_dict(to_dict(iv)) == iv
    for bad, message in [
        ({"kind": "ablate_heads", "layer": 0, "heads": []}, "non-empty"),
        ({"kind": "ablate_heads", "layer": -1, "heads": [0]}, "layer must be an integer >= 0"),
        ({"kind": "ablate_heads", "layer": 0, "heads": [1, 1]}, "twice"),
        ({"kind": "ablate_mlp", "layer": 0, "mode": "half"}, "mode must be one of"),
        ({"kind": "scale_head", "layer": 0, "head": 0, "factor": float("nan")}, "finite"),
        ({"kind": "scale_head", "layer": True, "head": 0, "factor": 1}, "integer"),
        ({"kind": "patch", "hook": "blocks.0.resid_pre", "source": ""}, "text of 1 to"),
        ({"kind": "steer", "layer": 0, "plus": "a" * 5000, "minus": "b"}, "text of 1 to"),
        ({"kind": "ablate_attn", "layer": 0, "evil": "__import__('os')"}, "no field"),
        ({"kind": "ablate_attn"}, "needs the fields"),
        ({"kind": "exec", "code": "1"}, "kind"),
        ("ablate_attn", "kind"),
    ]:
        with pytest.raises(InterventionError, match=message):
            from_dict(bad)


@pytest.mark.parametrize("iv, message", [
    (AblateHeads(layer=3, heads=(0,)), r"layer 3 does not exist; this model has layers 0..2"),
    (AblateHeads(layer=0, heads=(4,)), r"head 4 does not exist"),
    (ScaleHead(layer=0, head=9, factor=2), r"head 9 does not exist"),
    (AblateNeurons(layer=0, neurons=(512,)), r"neuron 512 does not exist"),
    (Patch(hook="blocks.0.attn.nothing", source="x"), r"cannot patch 'blocks.0.attn.nothing': no such hook point"),
    (Patch(hook="blocks.7.resid_pre", source="x"), r"cannot patch"),
    (Patch(hook="resid_pre.1", source="two words", positions=(5,)), r"position 5 is past the source text's 2 tokens"),
    (AddVector(layer=0, vector=(1.0, 2.0)), r"the vector has 2 numbers; this model's residual stream has 128"),
])
def test_interventions_that_do_not_fit_the_model_say_what_is_wrong(small, iv, message):
    _, model, tok = small
    with pytest.raises(InterventionError, match=message):
        resolve([iv], model, tok)
    with pytest.raises(InterventionError, match=message):
        GenerationSession(model, tok, TEXT, interventions=[iv])


def test_any_hook_point_can_be_patched_and_a_recording_session_refuses_what_it_cannot_show(small, tokenizer):
    hf, model, tok = small
    ids, src = tok.encode(TEXT), tok.encode(SOURCE)
    C = model.cfg.n_embd
    # the token embedding patched at positions 1 and 4: transformers reading the same embeddings
    with torch.no_grad():
        embeds = hf.transformer.wte(torch.tensor([ids])).clone()
        for p in (1, 4):
            embeds[0, p] = hf.transformer.wte.weight[src[p]]
        expected = hf(inputs_embeds=embeds).logits[0]
        with model.hooks(resolve([Patch(hook="embed", source=SOURCE, positions=(1, 4))], model, tok).hooks(0)):
            got = model(torch.tensor([ids]))[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # layer 1's queries patched from the source run at positions 2..5: by hand on transformers' c_attn output
    seen = {}
    handle = hf.transformer.h[1].attn.c_attn.register_forward_hook(lambda m, a, out: seen.__setitem__("q", out[0, :, :C].clone()))
    with torch.no_grad():
        hf(torch.tensor([src]))
    handle.remove()

    def patch_q(m, a, out):
        out = out.clone()
        out[0, 2:6, :C] = seen["q"][2:6]
        return out
    handle = hf.transformer.h[1].attn.c_attn.register_forward_hook(patch_q)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    handle.remove()
    plan = resolve([Patch(hook="q.1", source=SOURCE, positions=(2, 3, 4, 5))], model, tok)
    with torch.no_grad():
        with model.hooks(plan.hooks(0)):
            whole = model(torch.tensor([ids]))[0]
        kv, rows = model.new_kv_cache(), []
        for p in range(len(ids)):  # one token at a time: the flat decode step calls the q hook point too
            with model.hooks(plan.hooks(kv.length)):
                rows.append(model(torch.tensor([ids[p:p + 1]]), kv_cache=kv)[0])
    torch.testing.assert_close(whole, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(rows), expected, atol=1e-4, rtol=1e-4)
    # a pattern patched from the same text changes nothing; from another text it does, token by token too
    same = resolve([Patch(hook="blocks.2.attn.pattern", source=TEXT)], model, tok)
    other = resolve([Patch(hook="blocks.2.attn.pattern", source=SOURCE)], model, tok)
    keep = [("blocks.2.attn.pattern", lambda x, hook: None)]  # observed: the same (unfused) body
    with torch.no_grad():
        with model.hooks(keep):
            plain = model(torch.tensor([ids]))[0]
        with model.hooks(same.hooks(0)):
            assert torch.equal(model(torch.tensor([ids]))[0], plain)
        with model.hooks(other.hooks(0)):
            changed = model(torch.tensor([ids]))[0]
        kv, rows = model.new_kv_cache(), []
        for p in range(len(ids)):
            with model.hooks(other.hooks(kv.length)):
                rows.append(model(torch.tensor([ids[p:p + 1]]), kv_cache=kv)[0])
    assert (changed - plain).abs().max() > 1e-3
    torch.testing.assert_close(torch.cat(rows), changed, atol=1e-4, rtol=1e-4)
    assert not other.recordable and same.hooks
    with pytest.raises(InterventionError, match="a recording session recomputes attention"):
        GenerationSession(model, tok, TEXT, record=True, interventions=[Patch(hook="pattern.2", source=SOURCE)])
    s = GenerationSession(model, tok, TEXT, SamplingConfig(temperature=0), interventions=[Patch(hook="pattern.2", source=SOURCE)])
    assert s.step().token_id == int(changed[-1].argmax())
