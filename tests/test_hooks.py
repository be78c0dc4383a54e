"""Hook points: capture, replacement (ablation), cleanup and cache lookups."""

import pytest
import torch
import torch.nn.functional as F

TOKENS = torch.randint(0, 50257, (1, 21), generator=torch.Generator().manual_seed(2))


def test_every_hook_point_is_captured_with_documented_shapes(small_model):
    cfg = small_model.cfg
    T = TOKENS.shape[1]
    _, cache = small_model.run_with_cache(TOKENS)
    assert cache["embed"].shape == cache["pos_embed"].shape == (1, T, cfg.n_embd)
    assert cache["logits"].shape == (1, T, cfg.vocab_size)
    assert cache["ln_final"].shape == (1, T, cfg.n_embd)
    for layer in range(cfg.n_layer):
        for short in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
            assert cache[short, layer].shape == (1, T, cfg.n_embd)
        for short in ("q", "k", "v", "z"):
            assert cache[short, layer].shape == (1, cfg.n_head, T, cfg.d_head)
        assert cache["pattern", layer].shape == (1, cfg.n_head, T, T)
        assert cache["mlp_post", layer].shape == (1, T, cfg.d_mlp)
    # The residual stream composes as documented.
    torch.testing.assert_close(cache["resid_pre", 0], cache["embed"] + cache["pos_embed"])
    torch.testing.assert_close(cache["resid_mid", 1], cache["resid_pre", 1] + cache["attn_out", 1])
    torch.testing.assert_close(cache["resid_post", 1], cache["resid_mid", 1] + cache["mlp_out", 1])
    torch.testing.assert_close(cache["resid_pre", 2], cache["resid_post", 1])


def test_pattern_rows_sum_to_one_and_are_exactly_zero_above_the_diagonal(small_model):
    _, cache = small_model.run_with_cache(TOKENS, names=["pattern"])
    pattern = cache.stack("pattern")[:, 0]  # [layer, head, query, key]
    T = TOKENS.shape[1]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]), atol=1e-5, rtol=0)
    above = torch.ones(T, T, dtype=torch.bool).triu(1)
    assert torch.all(pattern[..., above] == 0)
    assert torch.all(pattern[..., ~above] > 0)


def test_cache_lookups_negative_layers_and_stack(small_model):
    _, cache = small_model.run_with_cache(TOKENS, names=["resid_post", "blocks.0.attn.pattern"])
    n = small_model.cfg.n_layer
    assert torch.equal(cache["resid_post", -1], cache[f"blocks.{n - 1}.resid_post"])
    assert torch.equal(cache["resid_post", -n], cache["blocks.0.resid_post"])
    assert cache.stack("resid_post").shape == (n, 1, TOKENS.shape[1], small_model.cfg.n_embd)
    assert ("pattern", 0) in cache and ("pattern", 1) not in cache
    with pytest.raises(IndexError, match="out of range"):
        cache["resid_post", n]
    with pytest.raises(KeyError, match="was not captured"):
        cache["pattern", 1]


def test_zeroing_one_head_changes_logits_as_recomputed_by_hand(small_model):
    layer, head = 1, 2
    logits, cache = small_model.run_with_cache(TOKENS)

    def ablate(z, hook):
        z = z.clone()
        z[:, head] = 0
        return z

    with torch.no_grad(), small_model.hooks([(("z", layer), ablate)]):
        ablated = small_model(TOKENS)
    assert (ablated - logits).abs().max() > 1e-3

    # By hand, with explicit tensor algebra from the clean run's activations.
    sd = {k: v for k, v in small_model.state_dict().items()}
    cfg = small_model.cfg
    z = cache["z", layer].clone()
    z[:, head] = 0
    B, H, T, D = z.shape
    attn_out = z.transpose(1, 2).reshape(B, T, H * D) @ sd[f"blocks.{layer}.attn.c_proj.weight"].T + sd[f"blocks.{layer}.attn.c_proj.bias"]
    x = cache["resid_pre", layer] + attn_out

    def mlp(x, i):
        h = F.layer_norm(x, (cfg.n_embd,), sd[f"blocks.{i}.ln_2.weight"], sd[f"blocks.{i}.ln_2.bias"], cfg.layer_norm_epsilon)
        h = h @ sd[f"blocks.{i}.mlp.c_fc.weight"].T + sd[f"blocks.{i}.mlp.c_fc.bias"]
        h = 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h**3)))
        return h @ sd[f"blocks.{i}.mlp.c_proj.weight"].T + sd[f"blocks.{i}.mlp.c_proj.bias"]

    def attention(x, i):
        h = F.layer_norm(x, (cfg.n_embd,), sd[f"blocks.{i}.ln_1.weight"], sd[f"blocks.{i}.ln_1.bias"], cfg.layer_norm_epsilon)
        qkv = h @ sd[f"blocks.{i}.attn.c_attn.weight"].T + sd[f"blocks.{i}.attn.c_attn.bias"]
        q, k, v = (t.reshape(B, T, H, D).transpose(1, 2) for t in qkv.split(cfg.n_embd, -1))
        scores = q @ k.transpose(-1, -2) / D**0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)
        return out @ sd[f"blocks.{i}.attn.c_proj.weight"].T + sd[f"blocks.{i}.attn.c_proj.bias"]

    x = x + mlp(x, layer)
    for i in range(layer + 1, cfg.n_layer):
        x = x + attention(x, i)
        x = x + mlp(x, i)
    x = F.layer_norm(x, (cfg.n_embd,), sd["ln_f.weight"], sd["ln_f.bias"], cfg.layer_norm_epsilon)
    expected = x @ sd["wte.weight"].T
    torch.testing.assert_close(ablated, expected, atol=1e-4, rtol=0)


def test_hooks_are_removed_after_an_exception(small_model):
    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        with small_model.hooks([(("pattern", 0), lambda x, h: seen.append(h.name)), ("logits", lambda x, h: None)]):
            small_model(TOKENS[:, :4])
            raise RuntimeError("boom")
    assert seen == ["blocks.0.attn.pattern"]
    assert all(not hp.fns for hp in small_model.hook_points.values())
    small_model(TOKENS[:, :4])
    assert seen == ["blocks.0.attn.pattern"]  # not called again


def test_hooks_are_removed_when_a_hook_itself_raises(small_model):
    def bad(x, hook):
        raise ValueError("bad hook")

    with pytest.raises(ValueError, match="bad hook"):
        with small_model.hooks([("blocks.1.resid_post", bad)]):
            small_model(TOKENS)
    assert all(not hp.fns for hp in small_model.hook_points.values())


def test_hook_errors_are_precise(small_model):
    with pytest.raises(KeyError, match="did you mean"):
        with small_model.hooks([("blocks.0.attn.patern", lambda x, h: None)]):
            pass
    with pytest.raises(ValueError, match="expected a tensor of shape"):
        with small_model.hooks([("embed", lambda x, h: x[:, :1])]):
            small_model(TOKENS)
    assert all(not hp.fns for hp in small_model.hook_points.values())


def test_patching_replaces_an_activation(small_model):
    """Patching the last block's output with another run's makes the logits those of that run."""
    other = torch.randint(0, 50257, TOKENS.shape, generator=torch.Generator().manual_seed(9))
    other_logits, other_cache = small_model.run_with_cache(other, names=[("resid_post", -1)])
    with torch.no_grad(), small_model.hooks([(("resid_post", -1), lambda x, h: other_cache["resid_post", -1])]):
        patched = small_model(TOKENS)
    torch.testing.assert_close(patched, other_logits)


def test_hooks_belong_to_the_thread_that_attached_them(small_model):
    """A model shared by web-server threads: one user's hooks never run in another's forward pass."""
    import threading

    seen_main, seen_other = [], []
    barrier = threading.Barrier(2)

    def other_user():
        with small_model.hooks([(("pattern", 0), lambda x, h: seen_other.append(x.shape))]):
            barrier.wait()
            small_model(TOKENS[:, :3])
            barrier.wait()

    t = threading.Thread(target=other_user)
    t.start()
    with small_model.hooks([(("pattern", 0), lambda x, h: seen_main.append(x.shape))]):
        barrier.wait()
        small_model(TOKENS[:, :5])
        barrier.wait()
    t.join()
    assert seen_main == [(1, small_model.cfg.n_head, 5, 5)]
    assert seen_other == [(1, small_model.cfg.n_head, 3, 3)]


def test_pytorch_module_hooks_fire_on_decode_steps_and_are_refused_where_they_cannot(small_model):
    """A forward hook registered with PyTorch on a module fires on every decode step (the flat step calls
    no module, so the model takes the modules while one is registered); the engine's ragged pass refuses."""
    model = small_model
    seen = []
    handle = model.blocks[1].mlp.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    try:
        kv = model.new_kv_cache()
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]), kv_cache=kv)
            model(torch.tensor([[4]]), kv_cache=kv)
            model(torch.tensor([[5]]), kv_cache=kv)
        assert seen == [(1, 3, model.cfg.n_embd), (1, 1, model.cfg.n_embd), (1, 1, model.cfg.n_embd)]
        with pytest.raises(RuntimeError, match="forward_ragged runs no nn.Module hooks"):
            model.forward_ragged([torch.tensor([1, 2])], [model.new_kv_cache()])
    finally:
        handle.remove()
    with torch.no_grad():
        model.forward_ragged([torch.tensor([1, 2])], [model.new_kv_cache()])  # without the hook it runs
