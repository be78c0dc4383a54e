"""The GPU checks of the hardware issue, for a machine with a CUDA GPU (and no Hub): run from the repository root,

    python scripts/gpu_check.py --out results.json [--cpu-only]

1. parity of the model on CUDA with the CPU's in float32 (logits within 1e-4) and the gap in float16 / bfloat16
   (largest logit and probability differences, top-1 agreement), on the bundled model and random checkpoints of
   gpt2's and gpt2-xl's shapes (no download needed);
2. decode tokens/s on CUDA for gpt2 and gpt2-xl shapes, beside the CPU's for gpt2 in the same run;
3. the app started with `--device cuda` on the gpt2-shaped checkpoint, streaming tokens through gradio_client.
`--cpu-only` runs item 1 with the CPU standing in for the GPU (bfloat16 on the CPU), to try the script here.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt2viz import GPT2, GPT2Config, GenerationSession, SamplingConfig, load_model, load_tokenizer, save_checkpoint  # noqa: E402
from gpt2viz.model import init_weights  # noqa: E402

SHAPES = {"gpt2": dict(n_layer=12, n_head=12, n_embd=768), "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600)}
TEXT = "ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun. " * 3


def checkpoint(shape: str, folder: Path) -> Path:
    if not (folder / "config.json").exists():
        save_checkpoint(init_weights(GPT2(GPT2Config(**SHAPES[shape])), seed=3), folder)
    return folder


@torch.no_grad()
def precision(source, device: str, dtypes, ids) -> dict:
    reference = load_model(source).float()
    want = reference(torch.tensor([ids]))[0].double()
    out = {}
    for dtype in dtypes:
        model = load_model(source, device=device, dtype=dtype)
        got = model(torch.tensor([ids], device=device))[0].double().cpu()
        p, q = torch.softmax(want, -1), torch.softmax(got, -1)
        out[str(dtype).removeprefix("torch.")] = {
            "max_logit_diff": float((got - want).abs().max()), "max_prob_diff": float((p - q).abs().max()),
            "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).double().mean())}
    return out


@torch.no_grad()
def decode_rate(source, device: str, tokenizer, n: int = 64, record: bool = True) -> float:
    model = load_model(source, device=device)
    session = GenerationSession(model, tokenizer, "The history of the city", SamplingConfig(seed=1, max_new_tokens=n), record=record)
    session.step()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(n - 1):
        session.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (n - 1) / (time.perf_counter() - started)


def app_streams(folder: Path) -> dict:
    from gradio_client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    app = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", str(folder), "--device", "cuda", "--port", str(port)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(240):
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(1)
        args = dict(model=f"local: {folder.name}", prompt="The history of the city", temperature=1.0, top_k=0, top_p=1.0,
                    repetition_penalty=1.0, max_new_tokens=10, seed=0, tokens_per_second=0)
        updates = list(client.submit(**args, api_name="/generate"))
        return {"updates": len(updates), "last_status": updates[-1][1]}
    finally:
        app.terminate()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--cpu-only", action="store_true")
    args = parser.parse_args()
    tok = load_tokenizer()
    ids = tok.encode(TEXT)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    gpt2 = checkpoint("gpt2", work / "gpt2")
    result: dict = {"torch": torch.__version__, "cuda": torch.version.cuda,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    if args.cpu_only:
        result["precision_cpu_bfloat16"] = {name: precision(src, "cpu", [torch.bfloat16], ids)
                                            for name, src in (("tiny-shakespeare", "tiny-shakespeare"), ("gpt2-shape", gpt2))}
    else:
        xl = checkpoint("gpt2-xl", work / "gpt2-xl")
        result["precision"] = {name: precision(src, "cuda", [torch.float32, torch.float16, torch.bfloat16], ids)
                               for name, src in (("tiny-shakespeare", "tiny-shakespeare"), ("gpt2-shape", gpt2), ("gpt2-xl-shape", xl))}
        result["decode_tokens_per_s"] = {"gpt2-shape cpu": decode_rate(gpt2, "cpu", tok), "gpt2-shape cuda": decode_rate(gpt2, "cuda", tok),
                                         "gpt2-xl-shape cuda": decode_rate(xl, "cuda", tok)}
        result["app_device_cuda"] = app_streams(gpt2)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
