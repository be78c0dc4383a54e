"""Why this token (gpt2viz/attribution.py) against an independent computation: transformers' GPT-2, its
per-head outputs and MLP activations captured with PyTorch hooks, the decomposition done in float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt2viz import GenerationSession, SamplingConfig, load_model
from gpt2viz.attribution import commitment, attribution, neuron_contributions, neuron_tokens, runner_up
from gpt2viz.interventions import AblateHeads

TEXT = "The old lighthouse keeper climbed the stairs every night to light"


@pytest.fixture(scope="module")
def setup(hf_checkpoints, tokenizer):
    hf, folder = hf_checkpoints["small"]
    model = load_model(folder)
    session = GenerationSession(model, tokenizer, TEXT, SamplingConfig(seed=2), record=True)
    for _ in range(4):
        session.step()
    session.read()
    return hf, model, session


def hf_parts(hf, ids):
    """Per layer the merged z entering attn.c_proj, the MLP's GELU output and output, and the stream entering ln_f."""
    seen = {"z": {}, "post": {}, "mlp": {}}
    handles = []
    for layer, block in enumerate(hf.transformer.h):
        handles.append(block.attn.c_proj.register_forward_pre_hook(lambda m, a, layer=layer: seen["z"].__setitem__(layer, a[0][0].double())))
        handles.append(block.mlp.c_proj.register_forward_pre_hook(lambda m, a, layer=layer: seen["post"].__setitem__(layer, a[0][0].double())))
        handles.append(block.mlp.register_forward_hook(lambda m, a, out, layer=layer: seen["mlp"].__setitem__(layer, out[0].double())))
    handles.append(hf.transformer.ln_f.register_forward_pre_hook(lambda m, a: seen.__setitem__("final", a[0][0].double())))
    try:
        with torch.no_grad():
            seen["logits"] = hf(torch.tensor([ids])).logits[0].double()
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def by_hand(hf, ids, p, a, b):
    """The decomposition of logit[a] - logit[b] after position p, in float64 from transformers' tensors."""
    seen = hf_parts(hf, ids)
    cfg = hf.config
    D = cfg.n_embd // cfg.n_head
    wte, wpe = hf.transformer.wte.weight.double(), hf.transformer.wpe.weight.double()
    ln = hf.transformer.ln_f
    r = seen["final"][p]
    sigma = torch.sqrt(r.var(unbiased=False) + ln.eps)
    d = wte[a] - wte[b]
    g = ln.weight.double() * d / sigma
    u = g - g.mean()
    heads = np.zeros((cfg.n_layer, cfg.n_head))
    mlp, bias = np.zeros(cfg.n_layer), np.zeros(cfg.n_layer)
    neurons = {}
    for layer, block in enumerate(hf.transformer.h):
        W = block.attn.c_proj.weight.double()  # Conv1D: [in, out]
        for h in range(cfg.n_head):
            heads[layer, h] = float(seen["z"][layer][p, h * D:(h + 1) * D] @ W[h * D:(h + 1) * D] @ u)
        bias[layer] = float(block.attn.c_proj.bias.double() @ u)
        mlp[layer] = float(seen["mlp"][layer][p] @ u)
        neurons[layer] = (seen["post"][layer][p] * (block.mlp.c_proj.weight.double() @ u)).numpy()
    return dict(logit_diff=float(seen["logits"][p, a] - seen["logits"][p, b]), embed=float(wte[ids[p]] @ u),
                pos_embed=float(wpe[p] @ u), heads=heads, attn_bias=bias, mlp=mlp, ln_bias=float(ln.bias.double() @ d),
                neurons=neurons, post={k: v[p].numpy() for k, v in seen["post"].items()})


@pytest.mark.parametrize("p", [0, 5, 11])
def test_the_parts_equal_the_decomposition_by_hand_and_sum_to_the_logit_difference(setup, p):
    hf, model, session = setup
    ids = session.ids
    target = ids[p + 1]
    a = attribution(session, p, target)
    assert a.baseline == runner_up(session, p, target) != target
    expected = by_hand(hf, ids, p, target, a.baseline)
    assert a.logit_diff == pytest.approx(expected["logit_diff"], abs=1e-4)
    for name in ("embed", "pos_embed", "ln_bias"):
        assert getattr(a, name) == pytest.approx(expected[name], abs=1e-4), name
    for name in ("heads", "attn_bias", "mlp"):
        np.testing.assert_allclose(getattr(a, name), expected[name], atol=1e-4, err_msg=name)
    assert a.parts_sum == pytest.approx(a.logit_diff, abs=1e-4) and abs(a.rest) < 1e-4
    assert max(abs(v) for _, v in a.top(3)) == max(abs(a.embed), abs(a.pos_embed), np.abs(a.heads).max(), np.abs(a.mlp).max())


@torch.no_grad()
def test_a_chosen_comparison_token_and_the_neurons_of_a_layer(setup, tokenizer):
    hf, model, session = setup
    ids, p = session.ids, 9
    target, other = tokenizer.encode(" is")[0], tokenizer.encode(" are")[0]
    a = attribution(session, p, target, other)
    expected = by_hand(hf, ids, p, target, other)
    np.testing.assert_allclose(a.mlp, expected["mlp"], atol=1e-4)
    for layer in range(model.cfg.n_layer):
        n = neuron_contributions(session, p, layer, target, other)
        np.testing.assert_allclose(n.activation, expected["post"][layer], atol=1e-4)
        np.testing.assert_allclose(n.contribution, expected["neurons"][layer], atol=1e-5)
        assert n.contribution.sum() + n.bias == pytest.approx(a.mlp[layer], abs=1e-4)  # a layer's neurons sum to its part
        top = n.top_contributors(3)
        assert abs(n.contribution[top[0]]) == np.abs(n.contribution).max()
    up, down = neuron_tokens(session, 1, int(top[0]))
    w = hf.transformer.h[1].mlp.c_proj.weight.double()[int(top[0])]  # Conv1D row = the neuron's output direction
    logits = hf.transformer.wte.weight.double() @ ((w - w.mean()) * hf.transformer.ln_f.weight.double())
    assert up == torch.topk(logits, 5).indices.tolist() and down == torch.topk(-logits, 5).indices.tolist()


def test_attribution_with_an_ablated_head_gives_that_head_nothing(setup, tokenizer):
    _, model, _ = setup
    s = GenerationSession(model, tokenizer, TEXT, SamplingConfig(seed=2), record=True, interventions=[AblateHeads(layer=1, heads=(2,))])
    s.step()
    s.read()
    a = attribution(s, 8, s.ids[9])
    assert a.heads[1, 2] == 0 and a.parts_sum == pytest.approx(a.logit_diff, abs=1e-4)


@torch.no_grad()
def test_commitment_is_the_layer_from_which_the_lens_keeps_the_final_guess(setup):
    hf, model, session = setup
    ids = session.ids
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    hidden = [h[0].double() for h in out.hidden_states[:-1]] + [hf_parts(hf, ids)["final"]]  # the last before ln_f
    ln, wte = hf.transformer.ln_f, hf.transformer.wte.weight.double()
    c = commitment(session, 3, len(ids))
    for i, p in enumerate(range(3, len(ids))):
        logits = [torch.nn.functional.layer_norm(h[p], (h.shape[-1],), ln.weight.double(), ln.bias.double(), ln.eps) @ wte.T for h in hidden]
        final = int(logits[-1].argmax())
        assert c.final[i] == final
        ranks = [int((lg > lg[final]).sum()) + 1 for lg in logits]
        assert list(c.rank[:, i]) == ranks
        stays = [j for j in range(len(ranks)) if all(r == 1 for r in ranks[j:])]
        assert c.layer[i] == min(stays)
        entropy = [float(-(torch.softmax(lg, -1) * torch.log_softmax(lg, -1)).sum()) for lg in logits]
        np.testing.assert_allclose(c.entropy[:, i], entropy, atol=1e-3)


def test_bad_arguments_are_refused(setup, tokenizer):
    _, model, session = setup
    with pytest.raises(ValueError, match="position must be in"):
        attribution(session, 999, 5)
    with pytest.raises(ValueError, match="target must be a token id"):
        attribution(session, 1, -3)
    with pytest.raises(ValueError, match="must differ"):
        attribution(session, 1, 7, 7)
    with pytest.raises(ValueError, match="recording session"):
        attribution(GenerationSession(model, tokenizer, TEXT), 0, 1)
    with pytest.raises(ValueError, match="layer must be in"):
        neuron_contributions(session, 1, 7, 5)


@pytest.fixture(scope="module")
def bundled(tokenizer):
    model = load_model("tiny-shakespeare")
    session = GenerationSession(model, tokenizer, "ROMEO:\nBut soft, what light through yonder", SamplingConfig(seed=4), record=True)
    for _ in range(6):
        session.step()
    session.read()
    return model, session


@pytest.mark.parametrize("which", ["distil", "bundled"])
@torch.no_grad()
def test_on_another_shape_and_the_bundled_model_each_head_is_its_z_through_its_slice_of_w_o(which, hf_checkpoints, tokenizer, request):
    if which == "bundled":
        model, session = request.getfixturevalue("bundled")
    else:
        model = load_model(hf_checkpoints["distil"][1])
        session = GenerationSession(model, tokenizer, TEXT, SamplingConfig(seed=1), record=True)
        for _ in range(3):
            session.step()
        session.read()
    ids = session.ids
    _, cache = model.run_with_cache(torch.tensor([ids]), names=["z", "ln_final", "blocks.%d.resid_post" % (model.cfg.n_layer - 1)])
    D, ln = model.cfg.d_head, model.ln_f
    for p in (1, len(ids) // 2, len(ids) - 2):
        a = attribution(session, p, ids[p + 1])
        assert a.parts_sum == pytest.approx(a.logit_diff, abs=1e-4)
        r = cache["resid_post", -1][0, p].double()
        d = (model.wte.weight[a.target] - model.wte.weight[a.baseline]).double()
        g = ln.weight.double() * d / torch.sqrt(r.var(unbiased=False) + ln.eps)
        u = g - g.mean()
        for layer in range(model.cfg.n_layer):
            z = cache["z", layer][0, :, p].double()  # [head, d_head], the module path's own z
            W = model.blocks[layer].attn.c_proj.weight.double()  # [out, in]
            by_hand = [float(z[h] @ W[:, h * D:(h + 1) * D].T @ u) for h in range(model.cfg.n_head)]
            np.testing.assert_allclose(a.heads[layer], by_hand, atol=1e-4)


def test_switching_the_top_head_off_with_the_later_layers_frozen_moves_the_difference_by_its_part(bundled, tokenizer):
    """Zero-ablate the head with the biggest part while every later layer's output is patched back from the
    unmodified run (frozen): the logit difference then changes by about that head's direct part (only the
    final layer norm's scale moves)."""
    from gpt2viz.compare import teacher_forced
    from gpt2viz.interventions import AblateHeads, Patch, resolve

    model, session = bundled
    ids = session.prompt_ids
    text = tokenizer.decode(ids)
    assert tokenizer.encode(text) == ids  # the patch source is read back as the same tokens
    p = len(ids) - 2
    a = attribution(session, p, ids[p + 1])
    layer, head = np.unravel_index(int(np.argmax(np.abs(a.heads))), a.heads.shape)
    frozen = [Patch(hook=f"blocks.{layer}.mlp_out", source=text)]
    frozen += [Patch(hook=f"blocks.{l}.{part}", source=text) for l in range(layer + 1, model.cfg.n_layer) for part in ("attn_out", "mlp_out")]
    plan = resolve([AblateHeads(layer=int(layer), heads=(int(head),))] + frozen, model, tokenizer)
    changed = teacher_forced(model, ids, plan)
    logits = changed.logits(p)
    new_diff = float(logits[a.target] - logits[a.baseline])
    assert abs(a.heads[layer, head]) > 0.2
    assert new_diff - a.logit_diff == pytest.approx(-a.heads[layer, head], rel=0.25, abs=0.05)


def test_every_sampled_step_drew_u_inside_its_tokens_slice_and_the_what_if_with_its_settings_gives_it_back(bundled):
    from gpt2viz.sampling import cdf_slice, draw_with, sampler_stages, uniform

    model, session = bundled
    for step in session.steps:
        assert step.method == "sampled" and step.config == session.config
        logits = session.capture.logits_at(step.position)
        final = sampler_stages(logits, session.ids[: step.position + 1], step.config)[-1].probs
        u = uniform(step.config.seed, step.position + 1)
        low, high = cdf_slice(final, step.token_id)
        assert low <= u < high
        assert draw_with(final, u) == step.token_id


def test_commitment_from_the_lens_cache_agrees_with_the_full_reading(setup):
    from gpt2viz.attribution import commitment_layers

    _, _, session = setup
    n = len(session.records)
    np.testing.assert_array_equal(commitment_layers(session, 0, n), commitment(session, 0, n).layer)


def test_the_tokens_of_several_neurons_at_once_are_each_neurons_own(setup):
    _, _, session = setup
    many = neuron_tokens(session, 2, [5, 17, 300], n=4)
    assert many == [neuron_tokens(session, 2, i, n=4) for i in (5, 17, 300)]


def test_the_sampler_anatomy_of_each_step_is_the_draw_the_generation_made(bundled):
    from gpt2viz.attribution import sampler_anatomy

    model, session = bundled
    n_prompt = len(session.prompt_ids)
    for step in session.steps:
        d = sampler_anatomy(session, step.position + 1)
        assert (d.token, d.method, d.config) == (step.token_id, "sampled", step.config)
        # the draw the generation made: torch's generator seeded for this position, u its first uniform number
        g = torch.Generator().manual_seed(step.config.seed * 1_000_003 + step.position + 1)
        assert d.u == torch.rand((), generator=g, dtype=torch.float64).item()
        low, high = d.slice
        assert low <= d.u < high
        assert d.what_if(step.config) == step.token_id
        assert d.what_if(SamplingConfig(temperature=0)) == int(torch.argmax(d.stages[1].probs))  # greedy: after the penalty
        assert float(d.stages[-1].probs[step.token_id]) == pytest.approx(step.prob_final, abs=1e-6)
        assert float(d.stages[0].probs[step.token_id]) == pytest.approx(step.prob, abs=1e-6)
    read = sampler_anatomy(session, n_prompt - 1)
    assert read.method == "read" and read.u is None and read.token == session.ids[n_prompt - 1]
    with pytest.raises(ValueError, match="first token"):
        sampler_anatomy(session, 0)


def test_a_trace_is_explained_like_the_session_that_read_its_text(setup, tokenizer):
    from gpt2viz import trace
    from gpt2viz.attribution import as_session, commitment_layers, sampler_anatomy

    _, model, session = setup
    tr = trace(model, tokenizer, session.ids)
    target = session.ids[9]
    a, b = attribution(tr, 8, target, model=model), attribution(session, 8, target)
    assert a.baseline == b.baseline
    np.testing.assert_allclose(a.heads, b.heads, atol=1e-5)
    np.testing.assert_allclose(a.mlp, b.mlp, atol=1e-5)
    n = neuron_contributions(tr, 8, 1, target, model=model)
    assert n.contribution.sum() + n.bias == pytest.approx(a.mlp[1], abs=1e-4)
    # the trace's own lens (its float32 pass) against the full reading checked against transformers above
    np.testing.assert_array_equal(commitment_layers(tr, 0, len(tr)), commitment(session, 0, len(tr)).layer)
    np.testing.assert_array_equal(commitment(tr, 2, 7, model=model).rank, commitment(session, 2, 7).rank)
    d = sampler_anatomy(tr, 5, SamplingConfig(temperature=0.5, top_k=3), model=model)
    assert d.method == "read" and d.stages[-1].name == "top-p" and int((d.stages[-1].probs > 0).sum()) <= 3
    with pytest.raises(ValueError, match="model="):
        attribution(tr, 8, target)
    with pytest.raises(TypeError, match="GenerationSession or a Trace"):
        attribution("some text", 1, 2)
    assert as_session(model, tr).ids == list(tr.tokens)
