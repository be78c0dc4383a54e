"""Head roles (gpt2viz/roles.py) against an independent computation, and on the two bundled models."""

from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2viz import load_model
from gpt2viz.roles import ROLE_THRESHOLD, distinct_tokens, head_scores, repeated_random_tokens

ROOT = Path(__file__).resolve().parent.parent


def test_scores_equal_a_by_hand_computation_on_transformers_attentions(hf_checkpoints):
    hf_model, folder = hf_checkpoints["small"]
    model = load_model(folder)
    L, batch, seed = 20, 3, 5
    scores = head_scores(model, length=L, batch=batch, seed=seed)
    tokens = repeated_random_tokens(distinct_tokens(model), L, batch, seed)
    with torch.no_grad():
        attentions = hf_model(tokens, output_attentions=True).attentions  # per layer [batch, head, q, k]
    for layer, att in enumerate(attentions):
        att = att.numpy()
        for head in range(att.shape[1]):
            for name, offset in (("previous_token", 1), ("duplicate_token", L), ("induction", L - 1)):
                by_hand = np.mean([att[b, head, i, i - offset] for b in range(batch) for i in range(L, 2 * L)])
                assert getattr(scores, name)[layer, head] == pytest.approx(by_hand, abs=1e-5)


def test_random_tokens_repeat_exactly_and_come_from_the_learned_vocabulary():
    model = load_model("tiny-shakespeare")
    known = distinct_tokens(model)
    assert 10_000 < len(known) < 50_257  # the bundled model shares one row among the tokens it never saw
    tokens = repeated_random_tokens(known, 30, 4, 0)
    assert torch.equal(tokens[:, :30], tokens[:, 30:])
    assert torch.isin(tokens, known).all()


def test_the_bundled_model_has_a_previous_token_head_and_no_induction_head():
    scores = head_scores(load_model("tiny-shakespeare"))
    assert scores.best("previous_token")[:2] == (0, 0) and scores.previous_token[0, 0] >= ROLE_THRESHOLD
    others = np.delete(scores.previous_token.ravel(), 0)
    assert others.max() < ROLE_THRESHOLD
    assert scores.induction.max() < ROLE_THRESHOLD  # so the induction lesson says it cannot show it


def test_the_toy_model_copies_the_repeat_and_cannot_predict_the_first_copy():
    from gpt2viz import load_tokenizer
    from gpt2viz.controller import induction_text

    model, tok = load_model("toy-induction"), load_tokenizer()
    ids = tok.encode(induction_text())
    L = len(ids) // 2
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    losses = -logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    first, second = losses[: L - 1].mean(), losses[L:].mean()
    assert second < 1.0 < 4.0 < first  # nats: it copies the second copy; the first is news to it


def test_the_toy_model_is_attention_only_small_and_has_an_induction_head():
    folder = ROOT / "assets" / "toy-induction"
    assert (folder / "model.safetensors").stat().st_size < 5_000_000
    model = load_model("toy-induction")
    assert (model.cfg.n_layer, model.cfg.n_head) == (2, 3)
    for block in model.blocks:  # attention only: every MLP weight and bias is zero
        assert all(float(p.detach().abs().max()) == 0 for p in block.mlp.parameters())
    scores = head_scores(model)
    layer, head, score = scores.best("induction")
    assert layer == 1 and score >= 2 * ROLE_THRESHOLD
    # Induction needs two layers: no layer-0 head can do it, and layer 0 has the previous-token head it composes with.
    assert scores.induction[0].max() < ROLE_THRESHOLD
    assert scores.previous_token[0].max() >= ROLE_THRESHOLD and scores.previous_token[1].max() < ROLE_THRESHOLD
