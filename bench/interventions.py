"""Interventions and coupled comparison against the plain recording session, in one run (issue #14).

    python bench/interventions.py                 # gpt2-small shape (random weights), 64 tokens, medians of 3
    python bench/interventions.py --quick         # a tiny shape, one repeat

Tokens per second of: a recording `GenerationSession` (what the page runs); the same with two heads
ablated (`AblateHeads`); `compare` (both runs and the report over the original text). The three
alternate within each repeat, so that a slow moment of the machine touches all of them.
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
from gpt2viz.compare import compare  # noqa: E402
from gpt2viz.interventions import AblateHeads  # noqa: E402
from gpt2viz.model import GPT2, init_weights  # noqa: E402

PROMPT = "The history of the city begins with a small market by the river, where traders from"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=256) if args.quick else GPT2Config()
    model = init_weights(GPT2(cfg).eval())
    tok = load_tokenizer()
    n = 8 if args.quick else args.new_tokens
    repeats = 1 if args.quick else args.repeats
    config = SamplingConfig(seed=1, max_new_tokens=n)
    ablation = [AblateHeads(layer=min(1, cfg.n_layer - 1), heads=(0, 1))]

    def plain():
        s = GenerationSession(model, tok, PROMPT, config, record=True)
        list(s.run())

    def intervened():
        s = GenerationSession(model, tok, PROMPT, config, record=True, interventions=ablation)
        list(s.run())

    def compared():
        compare(model, tok, PROMPT, config, ablation)

    contenders = {"plain recording session": plain, "two heads ablated": intervened, "compare (both runs + report)": compared}
    plain(), intervened(), compared()  # warm-up: mean caches, allocator
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    base = statistics.median(times["plain recording session"])
    result = {"shape": f"{cfg.n_layer}x{cfg.n_head}x{cfg.n_embd}", "new_tokens": n, "repeats": repeats, "rows": {}}
    for name, ts in times.items():
        t = statistics.median(ts)
        result["rows"][name] = {"seconds": t, "tokens_per_s": n / t, "x_plain": base / t}
        print(f"{name:32s} {n / t:7.1f} tokens/s  {base / t:5.2f}x plain")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
