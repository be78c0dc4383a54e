"""The benchmark tables of bench/README.md, written from a `bench/run.py --json` file.

    python bench/report.py bench/results/latest.json

Prints Markdown: the decode table (both shapes side by side), the prefill table, and the
figures quoted in the text, so that bench/README.md is regenerated from a run, never edited by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DECODE_LABELS = {
    "gpt2viz, no capture": "gpt2viz, no capture",
    "gpt2viz, app capture": "gpt2viz, **app capture**: every layer's residual stream and the embeddings of every position, "
                            "each token's log-probability, the top-N candidates at every sampling stage (attention rows and "
                            "the logit lens recomputed exactly from these when shown)",
    "gpt2viz, eager attention + logit lens every step": "gpt2viz, eager per-step attention + logit lens: as above without "
                                                        "recording, plus every layer's and head's attention row and the logit "
                                                        "lens of every layer computed at each step (the library's `generate`)",
    "transformers generate": "transformers `generate` (SDPA, no capture)",
    "transformers + attentions + hidden states": "transformers `generate` with attentions + hidden states every step (eager)",
}
REFERENCE = "transformers generate"
PREFILL_REFERENCE = "transformers eager + attentions"


def decode_table(shapes: dict) -> list[str]:
    names = list(shapes)
    head = "| |" + "".join(f" {n} | × transformers | peak extra MiB |" for n in names)
    lines = [head, "| --- |" + " ---: | ---: | ---: |" * len(names)]
    for key, label in DECODE_LABELS.items():
        cells = []
        for n in names:
            d, mem = shapes[n]["decode"], shapes[n]["memory_mib"]["decode"]
            ratio = d[key]["tokens_per_s"] / d[REFERENCE]["tokens_per_s"]
            bold = "**" if key.startswith("gpt2viz") else ""
            cells.append(f" {d[key]['tokens_per_s']:.1f} | {bold}{ratio:.2f}{bold} | {mem[key]:.0f} |")
        lines.append(f"| {label} |" + "".join(cells))
    return lines


def prefill_table(shapes: dict) -> list[str]:
    lines = ["| tokens | gpt2viz, no capture | gpt2viz, app capture | gpt2viz `trace` (every pattern materialised, logit "
             "lens at every position) | transformers eager + `output_attentions` | app capture ÷ transformers |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n, s in shapes.items():
        rows = s["prefill"]
        for T, row in rows.items():
            sec = [v["seconds"] for v in row.values()]
            ratio = row["gpt2viz, app capture"]["seconds"] / row[PREFILL_REFERENCE]["seconds"]
            bold = "**" if T == max(rows, key=int) else ""
            lines.append(f"| {n}, {T} | " + " | ".join(f"{x:.3f}" for x in sec) + f" | {bold}{ratio:.2f}{bold} |")
    return lines


def figures(shapes: dict) -> list[str]:
    out = []
    for n, s in shapes.items():
        v, app = s["view_recompute"], s.get("app", {})
        mem = next(m for k, m in s["memory_mib"].items() if k.startswith("prefill"))
        out.append(f"- {n}: views after the longest prompt: "
                   + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {x * 1e3:.1f} ms" for k, x in v.items()))
        out.append(f"- {n}: peak extra MiB of the longest prefill: " + ", ".join(f"{k} {x:.0f}" for k, x in mem.items()))
        out.append(f"- {n}: full trace " + ", ".join(f"{T} tokens {mib:.1f} MiB ({mib * 2**20 / 1e6:.1f} MB)"
                                                      for T, mib in s["trace_mib"].items()))
        if app:
            out.append(f"- {n}: app: first streamed token {app['first_token_s']:.2f} s; {app['bytes_per_step_median'] / 1024:.1f} KiB "
                       f"per step (median; {app['bytes_per_step_max'] / 1024:.1f} KiB max); Step to every view "
                       f"{app['step_to_views_s']:.2f} s, click on a token {app['click_to_views_s']:.2f} s, temperature to upcoming "
                       f"{app['temperature_to_upcoming_s']:.2f} s")
    return out


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    data = json.loads(Path(sys.argv[1]).read_text())
    shapes = data["shapes"]
    print(f"Measured {data['date']}: {data['machine']}, torch {data['torch']} ({data['threads']} threads), "
          f"transformers {data['transformers']}, median of {data['repeats']}.\n")
    print("\n".join(decode_table(shapes)) + "\n")
    print("\n".join(prefill_table(shapes)) + "\n")
    print("\n".join(figures(shapes)))


if __name__ == "__main__":
    main()
