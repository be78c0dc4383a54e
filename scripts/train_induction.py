"""Train `assets/toy-induction`: a 2-layer attention-only GPT-2 that has induction heads.

    python scripts/train_induction.py                  # the shipped model (~3 min on a 2-core CPU)
    python scripts/train_induction.py --steps 50 --out /tmp/t   # a quick smoke run

Data: random words in which a random segment of L words appears twice, at random places
(`filler, segment, filler, segment, filler`). Inside the second occurrence each next token can be
predicted by copying: find the earlier occurrence of the current token and predict the token after
it. Two attention layers do this with a previous-token head in layer 0 and an induction head in
layer 1 (Olsson et al. 2022). The loss covers every position (the unpredictable ones teach it to be
unsure there), the predictable ones weighted more.

Vocabulary: --vocab GPT-2 tokens of the form ' word' (lower-case letters), always including the
words of the app's induction example. As for the bundled model (scripts/train_tiny.py's
CorpusVocab), training softmaxes over those tokens plus one shared row for all the others, and the
exported 50,257-token model is exactly the same function: every other token shares that row.

Head starts (stated, as for tiny-shakespeare): head 0.0 starts as a previous-token head that passes
its token on (train_tiny's position prior for its query/key, a random rank-d_head projection for its
value/output, both held for --prior-steps, then free), and head 1.0 starts able to copy whatever it
attends to (value/output only). Where layer 1 attends, the induction part, is learned.
What did not work (each for thousands of steps): all 50,257 tokens with GPT-2's init (loss at
uniform: each token seen too rarely); a segment always at the start and repeated right after it
(the model learned to attend by position arithmetic and had no induction head); random places
without the copying start (loss at uniform for 3,000+ steps: layer 1's query/key and value/output
each help only once the other works).

Attention-only: the checkpoint is an ordinary GPT-2 (it loads everywhere one does) whose MLPs
are 4 units wide with every weight and bias zero and held at zero, so each MLP adds exactly 0
to the residual stream. Weights are saved in float16 to keep the file small; the model is
evaluated after the round trip.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt2viz import GPT2, GPT2Config, load_model, save_checkpoint  # noqa: E402
from gpt2viz.model import init_weights  # noqa: E402
from gpt2viz.roles import head_scores  # noqa: E402
from train_tiny import CorpusVocab, previous_token_prior, prior_rows, sinusoids  # noqa: E402
from gpt2viz.controller import WORDS  # noqa: E402
from gpt2viz.tokenizer import load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def repeated_batch(gen: torch.Generator, batch: int, length: int, vocab: int) -> torch.Tensor:
    """`[batch, 2 * length]`: random token ids, then the same ids again."""
    first = torch.randint(0, vocab, (batch, length), generator=gen)
    return torch.cat([first, first], dim=1)


def copy_prior(model: GPT2, head: int, gain: float, seed: int, layer: int = 0) -> None:
    """Start one head's value and output maps as `gain` times a random rank-d_head projection
    (W_O = W_V^T, orthonormal rows): the head starts by passing on what it attends to. Where it
    attends is left to training (layer 0's head 0 also gets the previous-token prior)."""
    cfg = model.cfg
    d, C = cfg.d_head, cfg.n_embd
    basis, _ = torch.linalg.qr(torch.randn(C, d, generator=torch.Generator().manual_seed(seed)))  # [C, d] orthonormal columns
    attn = model.blocks[layer].attn
    with torch.no_grad():
        attn.c_attn.weight[2 * C + head * d: 2 * C + (head + 1) * d] = gain * basis.T  # v rows
        attn.c_attn.bias[2 * C + head * d: 2 * C + (head + 1) * d] = 0
        attn.c_proj.weight[:, head * d:(head + 1) * d] = gain * basis  # the head's columns of the output map


def word_vocabulary(size: int, seed: int) -> np.ndarray:
    """`size` GPT-2 token ids of the form ' word' (random ones, plus the induction example's words), ascending."""
    tok = load_tokenizer()
    words = [i for i in range(tok.n_vocab - 1) if re.fullmatch(r" [a-z]{3,10}", tok.decode([i]))]
    must = {tok.encode(" " + w)[0] for w in WORDS}
    rest = [i for i in words if i not in must]
    picked = np.random.default_rng(seed).choice(rest, size=size - len(must), replace=False)
    return np.array(sorted(must | set(picked.tolist())), dtype=np.int64)


def training_batch(gen: torch.Generator, batch: int, ctx: int, n_vocab: int, max_length: int, easy: float = 0.0):
    """`(x [batch, ctx], predictable [batch, ctx - 1])`: random ids in [0, n_vocab) with one segment repeated
    at random places (in a fraction `easy` of the rows: at the start, repeated right after it);
    `predictable[b, t]` is True where the target x[b, t + 1] continues the repeat."""
    x = torch.randint(0, n_vocab, (batch, ctx), generator=gen)
    predictable = torch.zeros(batch, ctx - 1, dtype=torch.bool)
    for b in range(batch):
        length = int(torch.randint(4, max_length + 1, (1,), generator=gen))
        if b < batch * easy:  # the easy case first: the segment at the start, repeated right after it
            first, second = 0, length
        else:
            first = int(torch.randint(0, ctx - 2 * length + 1, (1,), generator=gen))
            second = int(torch.randint(first + length, ctx - length + 1, (1,), generator=gen))
        x[b, second:second + length] = x[b, first:first + length]
        predictable[b, second:second + length - 1] = True  # targets second+1 .. second+length-1
    return x, predictable


def training_loss(model: GPT2, x: torch.Tensor, predictable: torch.Tensor, bias: torch.Tensor, rest_weight: float) -> torch.Tensor:
    logits = model(x)[:, :-1] + bias
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none").view_as(predictable)
    return losses[predictable].mean() + rest_weight * losses[~predictable].mean()


@torch.no_grad()
def evaluate(model: GPT2, vocab: np.ndarray, seed: int = 1234, length: int = 30, batch: int = 32) -> dict:
    """Loss of the full-vocabulary model on fresh repeated sequences of the training words."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(vocab)[repeated_batch(gen, batch, length, len(vocab))]
    logits = model(x).float()
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none").view(batch, -1)
    model.train()
    return {"loss_first_copy": float(losses[:, : length - 1].mean()), "loss_second_copy": float(losses[:, length:].mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "assets" / "toy-induction"))
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-length", type=int, default=20, help="longest repeated segment")
    ap.add_argument("--rest-weight", type=float, default=0.2, help="weight of the unpredictable positions' loss")
    ap.add_argument("--easy", type=float, default=0.0, help="fraction of rows that are one segment twice from the start")
    ap.add_argument("--prior-steps", type=int, default=3000, help="hold head 0.0's priors for this many steps")
    ap.add_argument("--output-copy-prior", type=float, default=1.0, metavar="GAIN",
                    help="head 1.0 starts by copying what it attends to (value/output maps as for --copy-prior; not held; "
                         "where it attends is learned)")
    ap.add_argument("--copy-prior", type=float, default=1.0, metavar="GAIN",
                    help="head 0.0 also starts by passing its token on: its value/output maps are a random rank-d_head "
                         "projection times GAIN (0: GPT-2's init)")
    ap.add_argument("--prev-token-prior", type=float, default=3.0, metavar="GAIN",
                    help="start head 0.0 as a previous-token head (train_tiny's prior; 0: none); training may change it")
    ap.add_argument("--vocab", type=int, default=200, help="how many ' word' tokens to train on")
    ap.add_argument("--embed-norm", type=float, default=1.0, help="initial norm of each token embedding")
    ap.add_argument("--pos-norm", type=float, default=3.0, help="norm of each (sinusoidal) position embedding")
    ap.add_argument("--d-model", type=int, default=48)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    vocab_ids = word_vocabulary(args.vocab, args.seed)
    vocab = CorpusVocab(vocab_ids, 50257)
    bias = vocab.logit_bias()
    cfg = GPT2Config(vocab_size=vocab.size, n_positions=args.ctx, n_embd=args.d_model, n_layer=2, n_head=args.heads, n_inner=4)
    model = init_weights(GPT2(cfg), seed=args.seed)
    if args.prev_token_prior:
        previous_token_prior(model, head=0, gain=args.prev_token_prior)
    if args.copy_prior:
        copy_prior(model, head=0, gain=args.copy_prior, seed=args.seed)
    if args.output_copy_prior:
        copy_prior(model, head=0, gain=args.output_copy_prior, seed=args.seed + 1, layer=1)
    with torch.no_grad():
        # Token and position embeddings of equal norm: with GPT-2's 0.02 init a token's identity is a
        # twentieth of the layer norm's input beside a position code, too faint for a key to match on.
        model.wte.weight.normal_(0, args.embed_norm / math.sqrt(cfg.n_embd), generator=torch.Generator().manual_seed(args.seed))
        model.wpe.weight.copy_(sinusoids(cfg.n_positions, cfg.n_embd, norm=args.pos_norm))
        for block in model.blocks:
            for p in block.mlp.parameters():
                p.zero_()
                p.requires_grad_(False)
    held = prior_rows(model, head=0) if args.prev_token_prior else []
    if args.copy_prior:  # the head's value rows and its columns of the output map
        C, d = cfg.n_embd, cfg.d_head
        attn = model.blocks[0].attn
        held += [(attn.c_attn.weight, slice(2 * C, 2 * C + d), attn.c_attn.weight.detach()[2 * C:2 * C + d].clone()),
                 (attn.c_attn.bias, slice(2 * C, 2 * C + d), attn.c_attn.bias.detach()[2 * C:2 * C + d].clone())]
        held += [(attn.c_proj.weight, (slice(None), slice(0, d)), attn.c_proj.weight.detach()[:, :d].clone())]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(args.seed)
    started, log = time.time(), []
    model.train()
    for step in range(args.steps + 1):
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, args.steps))))
        for g in opt.param_groups:
            g["lr"] = lr
        x, predictable = training_batch(gen, args.batch, cfg.n_positions, len(vocab_ids), args.max_length, args.easy)  # compact ids
        loss = training_loss(model, x, predictable, bias, args.rest_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step < args.prior_steps:
            with torch.no_grad():  # undo this step's change to head 0.0's priors while the rest learns to use them
                for param, rows, value in held:
                    param[rows] = value
        if step % 100 == 0:
            entry = {"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - started, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)

    out = Path(args.out)
    full = vocab.expand(model.eval())
    for block in full.blocks:  # expand() copies every weight; the MLPs stay exactly zero
        assert all(float(p.detach().abs().max()) == 0 for p in block.mlp.parameters())
    save_checkpoint(full, out, dtype=torch.float16)
    shipped = load_model(out)  # evaluate what was written, after the float16 round trip
    metrics = evaluate(shipped, vocab_ids)
    scores = head_scores(shipped)
    report = {
        "what": "2-layer attention-only GPT-2 trained on repeated random token sequences (scripts/train_induction.py)",
        "args": vars(args), "seconds": round(time.time() - started, 1), **metrics,
        "uniform_loss_over_the_words": math.log(len(vocab_ids)), "words": len(vocab_ids),
        "scores": {name: np.round(v, 3).tolist() for name, v in scores.as_dict().items()},
        "log": log,
    }
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("seconds", "loss_first_copy", "loss_second_copy", "scores")}, indent=1))


if __name__ == "__main__":
    main()
