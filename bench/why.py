"""What "why this token" costs (issue #15), beside the step it explains, in one run.

    python bench/why.py            # gpt2-small shape (random weights), after a 128-token text, medians of 7
    python bench/why.py --quick    # a tiny shape

For the newest token of a recording session: one Step (the peer: what a class already waits for), the
attribution of that token to every head and MLP, one layer's neurons (with the tokens the top eight
raise and lower), the sampler's stages with the draw, and the "what if" redraw under other settings.
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
from gpt2viz.attribution import attribution, neuron_contributions, neuron_tokens  # noqa: E402
from gpt2viz.model import GPT2, init_weights  # noqa: E402
from gpt2viz.sampling import draw_with, sampler_stages, uniform  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=256) if args.quick else GPT2Config()
    model = init_weights(GPT2(cfg).eval())
    tok = load_tokenizer()
    ids = torch.randint(0, 50257, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    session = GenerationSession(model, tok, ids, SamplingConfig(seed=1), record=True)
    session.step()
    session.read()
    repeats = 2 if args.quick else args.repeats
    p = len(session.ids) - 1
    target = session.ids[p]
    layer = cfg.n_layer // 2

    def one_step():
        session.step()
        session.read()

    def explain():
        attribution(session, p - 1, target)

    def neurons():
        n = neuron_contributions(session, p - 1, layer, target)
        neuron_tokens(session, layer, [int(i) for i in n.top_contributors(8)], n=3)

    step = session.steps[0]
    logits = session.capture.logits_at(step.position)
    previous = session.ids[: step.position + 1]

    def anatomy():
        sampler_stages(logits, previous, step.config)
        uniform(step.config.seed, step.position + 1)

    other = SamplingConfig(temperature=1.4, top_k=40, top_p=0.9, seed=1)

    def what_if():
        draw_with(sampler_stages(logits, previous, other)[-1].probs, uniform(step.config.seed, step.position + 1))

    rows = {"one Step (forward + sampling + records)": one_step, "attribution of one token (every head and MLP)": explain,
            "one layer's neurons (+ the tokens of the top 8)": neurons, "the sampler's stages and the draw": anatomy,
            "what if: the same draw under other settings": what_if}
    for fn in rows.values():
        fn()  # warm-up
    times = {name: [] for name in rows}
    for _ in range(repeats):
        for name, fn in rows.items():
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    step_ms = 1000 * statistics.median(times["one Step (forward + sampling + records)"])
    result = {"shape": f"{cfg.n_layer}x{cfg.n_head}x{cfg.n_embd}", "text_tokens": 128, "rows": {}}
    for name, ts in times.items():
        ms = 1000 * statistics.median(ts)
        result["rows"][name] = {"ms": ms, "x_step": ms / step_ms}
        print(f"{name:50s} {ms:8.1f} ms  {ms / step_ms:5.2f}x a Step")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
