"""Train `assets/toy-induction`: a 2-layer attention-only GPT-2 that has an induction head.

    python scripts/train_induction.py                  # the shipped model (~10 min on a 2-core CPU)
    python scripts/train_induction.py --steps 50 --out /tmp/t   # a quick smoke run

Data: sequences of L uniformly random GPT-2 token ids (L varies per batch), repeated once. The
first copy cannot be predicted; the second can only be predicted by copying: find the earlier
occurrence of the current token and predict the token after it. Two attention layers do this
with a previous-token head in layer 0 and an induction head in layer 1 (Olsson et al. 2022).

Attention-only: the checkpoint is an ordinary GPT-2 (it loads everywhere one does) whose MLPs
are 4 units wide with every weight and bias zero and held at zero, so each MLP adds exactly 0
to the residual stream. Loss on the second copy only (the first copy's target is uniform noise).
Weights are saved in float16 to keep the file small; the model is evaluated after the round trip.
"""

from __future__ import annotations

import argparse
import json
import math
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
from train_tiny import sinusoids  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def repeated_batch(gen: torch.Generator, batch: int, length: int, vocab: int) -> torch.Tensor:
    """`[batch, 2 * length]`: random token ids, then the same ids again."""
    first = torch.randint(0, vocab, (batch, length), generator=gen)
    return torch.cat([first, first], dim=1)


def second_copy_loss(model: GPT2, x: torch.Tensor, length: int) -> torch.Tensor:
    """Mean next-token loss over the predictions made inside the second copy (targets x[L+1:])."""
    hidden = model(x, unembed=False)[:, length:-1]  # [batch, L - 1, d_model]: positions L .. 2L-2
    logits = F.linear(hidden, model.wte.weight)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, length + 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: GPT2, seed: int = 1234, length: int = 30, batch: int = 32) -> dict:
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    x = repeated_batch(gen, batch, length, model.cfg.vocab_size)
    logits = model(x).float()
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none").view(batch, -1)
    model.train()
    return {"loss_first_copy": float(losses[:, : length - 1].mean()), "loss_second_copy": float(losses[:, length:].mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "assets" / "toy-induction"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--d-model", type=int, default=48)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = GPT2Config(vocab_size=50257, n_positions=args.ctx, n_embd=args.d_model, n_layer=2, n_head=args.heads, n_inner=4)
    model = init_weights(GPT2(cfg), seed=args.seed)
    with torch.no_grad():
        model.wpe.weight.copy_(sinusoids(cfg.n_positions, cfg.n_embd, norm=1.0))
        for block in model.blocks:
            for p in block.mlp.parameters():
                p.zero_()
                p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(args.seed)
    started, log = time.time(), []
    model.train()
    for step in range(args.steps + 1):
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, args.steps))))
        for g in opt.param_groups:
            g["lr"] = lr
        length = int(torch.randint(8, args.ctx // 2 + 1, (1,), generator=gen))
        x = repeated_batch(gen, args.batch, length, cfg.vocab_size)
        loss = second_copy_loss(model, x, length)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0:
            entry = {"step": step, "loss_second_copy": round(loss.item(), 4), "seconds": round(time.time() - started, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)

    out = Path(args.out)
    save_checkpoint(model.eval(), out, dtype=torch.float16)
    shipped = load_model(out)  # evaluate what was written, after the float16 round trip
    metrics = evaluate(shipped)
    scores = head_scores(shipped)
    report = {
        "what": "2-layer attention-only GPT-2 trained on repeated random token sequences (scripts/train_induction.py)",
        "args": vars(args), "seconds": round(time.time() - started, 1), **metrics,
        "uniform_loss": math.log(cfg.vocab_size),
        "scores": {name: np.round(v, 3).tolist() for name, v in scores.as_dict().items()},
        "log": log,
    }
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("seconds", "loss_first_copy", "loss_second_copy", "scores")}, indent=1))


if __name__ == "__main__":
    main()
