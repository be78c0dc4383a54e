"""How many tokens a second this machine's cores can give a class, and where a batched pass spends them.

    python bench/ceiling.py                 # gpt2-small shape, 30 sessions, medians of 7 passes
    python bench/ceiling.py --sessions 30 60 --json bench/results/ceiling.json
    python bench/ceiling.py --quick         # a tiny shape (the smoke test)

In one process, no web server, random weights of gpt2's shape (12 x 12, 768 wide), float32:
- one recording session alone, decoding (`read_together` + `step_together`, what the engine runs for it);
- N recording sessions decoding together, the same calls (what the engine runs for a class);
- the parts of that N-row pass timed on their own: only its matrix products (the 48 packed products of the
  blocks and the unembedding of the N rows: the floor any exact float32 pass has on these cores), the products
  plus choosing the tokens (the sampler over N rows of 50,257 probabilities), and the rest.
Each figure is tokens per second and its ratio to the session alone in the same run: the load benchmark's
targets (`bench/load.py`: together >= 8x one student, each >= 5 tokens/s at 30) set against what the cores
can do at all. Not a test: figures go to bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt2viz import GPT2, GPT2Config, SamplingConfig, load_tokenizer  # noqa: E402
from gpt2viz.generation import GenerationSession, read_together, step_together  # noqa: E402
from gpt2viz.model import init_weights, packed_linear  # noqa: E402


def sessions(model, tokenizer, n: int, seed: int = 0) -> list[GenerationSession]:
    """n recording sessions, each after its own prompt of 40-100 tokens, prompts read and a first token chosen."""
    rng = np.random.default_rng(seed)
    out = [GenerationSession(model, tokenizer, [int(x) for x in rng.integers(0, 50000, 40 + (2 * i) % 60)],
                             SamplingConfig(seed=i), record=True) for i in range(n)]
    read_together(out)
    step_together(out, [None] * n)
    return out


def decode_passes(group: list[GenerationSession], repeats: int) -> tuple[float, float]:
    """Median seconds of a decode pass (`read_together`: the forward pass and what the sessions keep of it) and
    of choosing the tokens after it (`step_together`), over `repeats` tokens for every session."""
    reads, chooses = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        read_together(group)
        t1 = time.perf_counter()
        step_together(group, [None] * len(group))
        reads.append(t1 - t0)
        chooses.append(time.perf_counter() - t1)
    return statistics.median(reads), statistics.median(chooses)


def products_only(model: GPT2, n: int):
    """The matrix products of an n-row decode pass, nothing else (the same packed weights, the same shapes)."""
    packed = model._packed_weights()
    C = model.cfg.n_embd
    x, h = torch.randn(n, C), torch.randn(n, model.cfg.d_mlp)

    def run() -> None:
        for w_attn, w_proj, w_fc, w_mlp in packed[:-1]:
            packed_linear(x, w_attn, None)
            packed_linear(x, w_proj, None)
            packed_linear(x, w_fc, None)
            packed_linear(h, w_mlp, None)
        packed_linear(x, packed[-1], None)
    return run


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[30])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="a tiny shape, for the smoke test (tests/test_bench_smoke.py)")
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=4, n_embd=64) if args.quick else dict(n_layer=12, n_head=12, n_embd=768)
    model = init_weights(GPT2(GPT2Config(**shape, n_positions=1024))).eval()
    tokenizer = load_tokenizer()
    alone = sessions(model, tokenizer, 1)
    one = 1 / sum(decode_passes(alone, args.repeats * 3))
    floor_one = 1 / median_seconds(products_only(model, 1), args.repeats * 3)
    report = dict(threads=torch.get_num_threads(), alone_tps=one, alone_products_tps=floor_one, levels=[])
    print(f"torch threads {torch.get_num_threads()}; one session alone {one:.1f} tokens/s "
          f"(its products alone: {floor_one:.1f})")
    print("| sessions | together, tokens/s (x alone) | products only | products + choosing | pass: products / choosing / the rest, ms |")
    print("|---|---|---|---|---|")
    for n in args.sessions:
        group = sessions(model, tokenizer, n, seed=n)
        reading, choosing = decode_passes(group, args.repeats)
        full = reading + choosing
        products = median_seconds(products_only(model, n), args.repeats)
        level = dict(sessions=n, together_tps=n / full, products_tps=n / products, products_choosing_tps=n / (products + choosing),
                     pass_ms=1000 * full, products_ms=1000 * products, choosing_ms=1000 * choosing)
        report["levels"].append(level)
        print(f"| {n} | {n / full:.1f} (x{n / full / one:.1f}) | {n / products:.1f} (x{n / products / one:.1f}) "
              f"| {n / (products + choosing):.1f} (x{n / (products + choosing) / one:.1f}) "
              f"| {1000 * products:.0f} / {1000 * choosing:.0f} / {1000 * (full - products - choosing):.0f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
