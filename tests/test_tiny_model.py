"""The bundled offline model: loads everywhere, has learned Shakespeare, and shows structure a class can find."""

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2viz import SamplingConfig, generate, load_model

ROOT = Path(__file__).resolve().parent.parent
ASSET = ROOT / "assets" / "tiny-shakespeare"
FIXTURE = Path(__file__).parent / "fixtures" / "heldout_shakespeare.txt"


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-shakespeare")


@pytest.fixture(scope="module")
def heldout(tokenizer) -> list[int]:
    text = "".join(line for line in FIXTURE.read_text(encoding="utf-8").splitlines(keepends=True) if not line.startswith("#"))
    return tokenizer.encode_ordinary(text)


def windows(ids: list[int], size: int):
    for start in range(0, len(ids) - 1, size - 1):
        chunk = ids[start:start + size]
        if len(chunk) > 1:
            yield torch.tensor([chunk])


def test_shape_size_and_both_loaders_agree(tiny, heldout):
    assert (ASSET / "model.safetensors").stat().st_size <= 25 * 2**20
    assert tiny.cfg.n_positions >= 256 and tiny.cfg.n_layer >= 4
    by_path = load_model(ASSET)
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(ASSET, dtype=torch.float32).eval()
    x = torch.tensor([heldout[:200]])
    with torch.no_grad():
        ours, theirs, again = tiny(x), hf(x).logits, by_path(x)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert torch.equal(ours, again)


def test_heldout_loss_is_far_below_the_unigram_baseline(tiny, heldout):
    """Mean loss on held-out text vs a unigram model of the training split (add-one smoothed), same text."""
    stats = json.loads((ASSET / "unigram.json").read_text())
    counts = np.ones(tiny.cfg.vocab_size)
    counts[stats["ids"]] += stats["counts"]
    unigram_logp = np.log(counts / counts.sum())
    losses = []
    with torch.no_grad():
        for x in windows(heldout, tiny.cfg.n_positions):
            logits = tiny(x)[0]
            losses += torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:], reduction="none").tolist()
    model_loss = float(np.mean(losses))
    targets = [t for x in windows(heldout, tiny.cfg.n_positions) for t in x[0, 1:].tolist()]
    baseline = float(-unigram_logp[targets].mean())
    assert len(losses) == len(targets) > 1500
    assert model_loss <= baseline - 1.5, (model_loss, baseline)


def test_greedy_continuation_is_words_not_noise(tiny, tokenizer):
    stats = json.loads((ASSET / "unigram.json").read_text())
    vocab = set(stats["ids"])
    steps = list(generate(tiny, tokenizer, "HAMLET:\nTo be, or not to be", SamplingConfig(temperature=0, max_new_tokens=40)))
    ids = [s.token_id for s in steps]
    text = steps[-1].text
    assert len(set(ids)) >= 8, text  # not a repeated single token
    assert sum(i in vocab for i in ids) / len(ids) >= 0.9
    assert all(ch in string.printable for ch in text), text
    words = [w.strip(string.punctuation) for w in text.split()]
    assert sum(w.isalpha() for w in words if w) / max(1, len([w for w in words if w])) >= 0.8, text


def test_a_head_attends_mainly_to_the_previous_token(tiny, heldout):
    """A structure a class can find in the attention view: some head puts at least half its attention on t-1."""
    L, H = tiny.cfg.n_layer, tiny.cfg.n_head
    on_previous, count = torch.zeros(L, H), 0
    for x in windows(heldout, tiny.cfg.n_positions):
        _, cache = tiny.run_with_cache(x, names=["pattern"])
        pattern = cache.stack("pattern")[:, 0]  # [layer, head, query, key]
        on_previous += pattern.diagonal(offset=-1, dim1=-2, dim2=-1).sum(-1)
        count += x.shape[1] - 1
    on_previous /= count
    assert count > 1500
    assert on_previous.max() >= 0.5, on_previous
    # and not every head does it: the structure is specific to some heads
    assert (on_previous < 0.3).sum() >= L * H // 2, on_previous
