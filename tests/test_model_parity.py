"""gpt2viz's GPT-2 against Hugging Face transformers' GPT2LMHeadModel on the same weights."""

import pytest
import torch

from gpt2viz import load_model

TOL = 1e-4


@pytest.mark.parametrize("shape", ["small", "distil"])
def test_logits_hidden_states_and_attentions_match_transformers(hf_checkpoints, shape):
    hf_model, folder = hf_checkpoints[shape]
    model = load_model(folder)
    n_layer = model.cfg.n_layer
    tokens = torch.randint(0, 50257, (2, 37), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = hf_model(tokens, output_hidden_states=True, output_attentions=True)
    logits, cache = model.run_with_cache(tokens)

    assert logits.shape == ref.logits.shape
    torch.testing.assert_close(logits, ref.logits, atol=TOL, rtol=0)
    # transformers' hidden_states: the residual stream entering each block, then ln_f of the last one.
    assert len(ref.hidden_states) == n_layer + 1
    for layer in range(n_layer):
        torch.testing.assert_close(cache["resid_pre", layer], ref.hidden_states[layer], atol=TOL, rtol=0)
        torch.testing.assert_close(cache["pattern", layer], ref.attentions[layer], atol=TOL, rtol=0)
    torch.testing.assert_close(cache["ln_final"], ref.hidden_states[n_layer], atol=TOL, rtol=0)
    # The attention is not trivially uniform on these weights: the comparison has teeth.
    assert cache["pattern", 0][0, :, -1].max() > 0.2


def test_fast_path_equals_observed_path(small_model):
    tokens = torch.randint(0, 50257, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fast = small_model(tokens)
    observed, cache = small_model.run_with_cache(tokens, names=["pattern"])
    assert len(cache) == small_model.cfg.n_layer
    torch.testing.assert_close(fast, observed, atol=TOL, rtol=0)


def test_decode_step_equals_the_modules_activation_by_activation(small_model, monkeypatch):
    """One new token takes GPT2._decode_step unless attention scores or patterns are observed; every hook
    point sees the same tensor there as in the modules, and a hook that replaces one (here: head 1's z
    zeroed in layer 1) changes both alike."""
    from gpt2viz.model import GPT2

    calls = []
    decode_step = GPT2._decode_step
    monkeypatch.setattr(GPT2, "_decode_step", lambda self, *a: calls.append(1) or decode_step(self, *a))
    model = small_model
    tokens = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(9))
    fast_kv, module_kv = model.new_kv_cache(), model.new_kv_cache()
    names = [n for n in model.hook_points if not n.endswith(("scores", "pattern"))]

    def ablate(z, hook):
        z = z.clone()
        z[:, 1] = 0
        return z

    with torch.no_grad():
        model(tokens[:, :6], kv_cache=fast_kv)
        model(tokens[:, :6], kv_cache=module_kv)
        assert not calls  # a prompt of several tokens goes through the modules
        for t in range(6, 12):
            new = tokens[:, t:t + 1]
            fast, fast_acts = model.run_with_cache(new, names=names, kv_cache=fast_kv, fwd_hooks=[("blocks.1.attn.z", ablate)])
            saved = {}
            with model.hooks([("blocks.1.attn.z", ablate)] + [(n, lambda x, hook: saved.__setitem__(hook.name, x.clone()))
                                                               for n in names]):
                by_modules = model(new, kv_cache=module_kv, body="modules")
            assert torch.equal(fast, by_modules)
            assert set(saved) == set(names) and len(fast_acts) == len(names)
            for name in names:
                assert torch.equal(fast_acts[name], saved[name]), name
            assert fast_acts["blocks.1.attn.z"][:, 1].abs().max() == 0
    assert len(calls) == 6 and fast_kv.length == module_kv.length == 12
    for layer in range(model.cfg.n_layer):
        assert torch.equal(fast_kv.keys(layer), module_kv.keys(layer))
    # observing a pattern takes the modules (the fused kernel computes none)
    _, cache = model.run_with_cache(tokens[:, :1], names=["pattern"], kv_cache=model.new_kv_cache())
    assert len(calls) == 6 and cache["pattern", 0].shape == (2, model.cfg.n_head, 1, 1)


def test_cached_decoding_matches_transformers_past_key_values(hf_checkpoints):
    hf_model, folder = hf_checkpoints["distil"]
    model = load_model(folder)
    tokens = torch.randint(0, 50257, (1, 20), generator=torch.Generator().manual_seed(4))
    kv = model.new_kv_cache()
    with torch.no_grad():
        ref = hf_model(tokens[:, :8], use_cache=True)
        model(tokens[:, :8], kv_cache=kv)
        for t in range(8, 20):
            ref = hf_model(tokens[:, t:t + 1], cache=ref.cache, use_cache=True)
            torch.testing.assert_close(model(tokens[:, t:t + 1], kv_cache=kv), ref.logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("observe", [False, True], ids=["fused", "observed"])
def test_kv_cache_decoding_equals_full_forward_at_every_step(small_model, observe):
    tokens = torch.randint(0, 50257, (1, 30), generator=torch.Generator().manual_seed(11))
    kv = small_model.new_kv_cache()
    names = ["pattern"] if observe else []
    logits, cache = small_model.run_with_cache(tokens[:, :5], names=names, kv_cache=kv)
    steps = [logits[:, -1]]
    patterns = [cache["pattern", -1][0, :, -1]] if observe else []
    for t in range(5, 30):
        logits, cache = small_model.run_with_cache(tokens[:, t:t + 1], names=names, kv_cache=kv)
        assert logits.shape[1] == 1
        steps.append(logits[:, -1])
        if observe:
            assert cache["pattern", -1].shape[-2:] == (1, t + 1)
            patterns.append(cache["pattern", -1][0, :, -1])
    assert kv.length == 30
    full, full_cache = small_model.run_with_cache(tokens, names=["pattern"])
    for i, step_logits in enumerate(steps):
        torch.testing.assert_close(step_logits, full[:, 4 + i], atol=TOL, rtol=0)
    for i, row in enumerate(patterns):
        q = 4 + i
        torch.testing.assert_close(row, full_cache["pattern", -1][0, :, q, : q + 1], atol=TOL, rtol=0)


def test_kv_cache_chunked_prefill_and_rewind(small_model):
    tokens = torch.randint(0, 50257, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = small_model(tokens)
        kv = small_model.new_kv_cache()
        a = small_model(tokens[:, :10], kv_cache=kv)
        b = small_model(tokens[:, 10:24], kv_cache=kv)  # several new positions after a past
        torch.testing.assert_close(torch.cat([a, b], 1), full, atol=TOL, rtol=0)
        kv.truncate(7)  # rewind, then branch with the same tokens: identical to the full pass
        c = small_model(tokens[:, 7:24], kv_cache=kv)
        torch.testing.assert_close(c, full[:, 7:], atol=TOL, rtol=0)


def test_context_length_is_enforced(small_model):
    from gpt2viz import ContextLengthError

    n = small_model.cfg.n_positions
    with pytest.raises(ContextLengthError, match=f"exceeds the model's context of {n}"):
        small_model(torch.zeros(1, n + 1, dtype=torch.long))
    kv = small_model.new_kv_cache()
    with torch.no_grad():
        small_model(torch.zeros(1, n, dtype=torch.long), kv_cache=kv)
    with pytest.raises(ContextLengthError):
        small_model(torch.zeros(1, 1, dtype=torch.long), kv_cache=kv)


def test_bad_token_ids_are_refused(small_model):
    with pytest.raises(ValueError, match="token id 50257 is outside the vocabulary"):
        small_model(torch.tensor([[1, 50257]]))
    with pytest.raises(ValueError, match="empty"):
        small_model(torch.zeros(1, 0, dtype=torch.long))


def test_unembedding_follows_the_embedding_and_autograd(hf_checkpoints):
    """The unembedding uses a cached transposed copy outside autograd; it must never go stale."""
    model = load_model(hf_checkpoints["small"][1])
    x = torch.randn(3, model.cfg.n_embd, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model.unembed(x)
        torch.testing.assert_close(before, x @ model.wte.weight.T, atol=1e-5, rtol=0)
        model.wte.weight[7] += 1.0  # an in-place change, as an optimiser step or a weight edit makes
        after = model.unembed(x)
    assert torch.equal(after[:, :7], before[:, :7]) and not torch.allclose(after[:, 7], before[:, 7])
    torch.testing.assert_close(after, x @ model.wte.weight.T, atol=1e-5, rtol=0)
    model.wte.weight.requires_grad_(True)
    model.unembed(x).sum().backward()  # with autograd, gradients reach the embedding
    torch.testing.assert_close(model.wte.weight.grad, x.sum(0).expand_as(model.wte.weight), atol=1e-5, rtol=0)


def test_the_body_is_chosen_explicitly_or_refused_where_it_cannot_run(small_model):
    kv = small_model.new_kv_cache()
    tokens = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        small_model(tokens, kv_cache=kv, body="modules")
        flat = small_model(torch.tensor([[8]]), kv_cache=kv, body="flat")
        kv.truncate(3)
        modules = small_model(torch.tensor([[8]]), kv_cache=kv, body="modules")
        assert torch.equal(flat, modules)
        with pytest.raises(ValueError, match="the flat decode step reads one new position"):
            small_model(tokens, kv_cache=small_model.new_kv_cache(), body="flat")
        with pytest.raises(ValueError, match="body must be"):
            small_model(tokens, body="fast")
