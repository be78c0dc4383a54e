"""What it costs to rebuild an evicted student's session (issue #13), old way beside new, in one run.

    python bench/rebuild.py            # gpt2-small shape (random weights), a 24-token prompt + 100 generated
    python bench/rebuild.py --quick    # a tiny shape

The peer: the tokens taken again one decode step each, as forced tokens (before `GenerationSession.replay`).
Now: `replay`, which reads the prompt, then every other token in one more pass, and draws each token again.
Both end with the whole text read, as the page needs it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2viz import GenerationSession, GPT2Config, SamplingConfig, load_tokenizer  # noqa: E402
from gpt2viz.model import GPT2, init_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--generated", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=256) if args.quick else GPT2Config()
    model = init_weights(GPT2(cfg).eval())
    tok = load_tokenizer()
    prompt = torch.randint(0, 50257, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    config = SamplingConfig(seed=3)
    original = GenerationSession(model, tok, prompt, config, record=True)
    for _ in range(args.generated):
        original.step()
    tokens = [s.token_id for s in original.steps]

    def forced():
        s = GenerationSession(model, tok, prompt, config, record=True)
        for t in tokens:
            s.step(force=t)
        s.read()
        return s

    def replayed():
        s = GenerationSession(model, tok, prompt, config, record=True)
        s.replay(tokens, "s" * len(tokens))
        s.read()
        return s

    times = {"forced, one step a token (peer)": [], "replay": []}
    for _ in range(args.repeats):
        for name, fn in (("forced, one step a token (peer)", forced), ("replay", replayed)):
            started = time.perf_counter()
            got = fn()
            times[name].append(time.perf_counter() - started)
            assert got.ids == original.ids
    medians = {k: statistics.median(v) for k, v in times.items()}
    peer = medians["forced, one step a token (peer)"]
    for name, t in medians.items():
        print(f"{name:34s} {t * 1000:8.0f} ms   {t / peer:5.2f}x the peer")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": vars(cfg), "generated": args.generated, "seconds": times}, indent=2, default=str))


if __name__ == "__main__":
    main()
