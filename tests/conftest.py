"""Shared fixtures: random-weight GPT-2 checkpoints in the exact Hugging Face Hub layout.

The checkpoints are written by `transformers` itself (the reference implementation), so
gpt2viz's loader is tested against files it did not produce.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Two shapes: n_head != n_layer with a width that is not 768, and a distilgpt2-like one.
SHAPES = {
    "small": dict(n_layer=3, n_head=4, n_embd=128, n_positions=64),
    "distil": dict(n_layer=6, n_head=12, n_embd=768, n_positions=128),
}


def make_hf_model(shape: dict, seed: int):
    """A transformers GPT2LMHeadModel with random weights large enough to give peaked attention."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=50257, **shape)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.set_attn_implementation("eager")  # the implementation that returns attention weights
    gen = torch.Generator().manual_seed(seed)
    scale = cfg.n_embd**-0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif "c_attn" in name:
                p.copy_(1.2 * scale * torch.randn(p.shape, generator=gen))
            elif name.endswith("wte.weight") or name.endswith("wpe.weight"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.5 * scale * torch.randn(p.shape, generator=gen))
    return model


def write_hub_checkpoint(model, folder: Path) -> Path:
    """save_pretrained: config.json + model.safetensors, exactly as the Hub serves them."""
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """{shape name: (transformers model, checkpoint folder)}."""
    out = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        model = make_hf_model(shape, seed=100 + i)
        out[name] = (model, write_hub_checkpoint(model, tmp_path_factory.mktemp(f"ckpt-{name}")))
    return out


@pytest.fixture(scope="session")
def small_checkpoint(hf_checkpoints) -> Path:
    return hf_checkpoints["small"][1]


@pytest.fixture(scope="session")
def small_model(small_checkpoint):
    from gpt2viz import load_model

    return load_model(small_checkpoint)


@pytest.fixture(scope="session")
def tokenizer():
    from gpt2viz import load_tokenizer

    return load_tokenizer()


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(tmp_path_factory, extra_args=()):
    """`python app.py` as a user runs it, with no Hub; yields its URL, then stops it and checks its log."""
    import re
    import subprocess
    import sys
    import time
    import urllib.request

    root = Path(__file__).resolve().parent.parent
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path_factory.mktemp("hf-empty")),
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    env.pop("GPT2VIZ_MODEL", None)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), *extra_args], cwd=root, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"app did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    # Gradio itself logs the input it refuses (out-of-range sliders); our own code must never fail.
    text = log.read_text()
    ours = re.findall(r'File ".*(?:app\.py|gpt2viz/[a-z_]+\.py)".*', text) + re.findall(r"ERROR:gpt2viz.*", text)
    assert not ours, f"the app's own code failed:\n{text[-4000:]}"
    assert "Traceback" not in text, f"a refused request logged a traceback:\n{text[-4000:]}"  # one line each instead
    assert "startup objects frozen" in text  # full collections under load visit only what came after (gpt2viz/memory.py)


@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    """The app with no Hub: it must fall back to the bundled models."""
    yield from start_app(tmp_path_factory)


# GPT-2's layer and head counts (gpt2 / gpt2-medium) at a small width, so that the page's figures
# are checked at the real shapes without loading hundreds of megabytes.
DEEP_SHAPES = {"12x12": dict(n_layer=12, n_head=12, n_embd=96, n_positions=256),
               "24x16": dict(n_layer=24, n_head=16, n_embd=128, n_positions=256)}


@pytest.fixture(scope="session", params=list(DEEP_SHAPES))
def deep_app_url(request, tmp_path_factory):
    """The app serving a random checkpoint with GPT-2's layer x head counts: (shape name, url)."""
    from gpt2viz import GPT2, GPT2Config, save_checkpoint
    from gpt2viz.model import init_weights

    folder = tmp_path_factory.mktemp(f"deep-{request.param}")
    save_checkpoint(init_weights(GPT2(GPT2Config(**DEEP_SHAPES[request.param])), seed=1), folder)
    for url in start_app(tmp_path_factory, ["--model", str(folder)]):
        yield request.param, url
