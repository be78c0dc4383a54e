"""Where the models run (gpt2viz/hardware.py): Python 3.10-3.12, the requirements per Python version, the
ZeroGPU wiring under a stand-in `spaces` module, and the generation on a GPU lent per call, run here on the CPU."""

from __future__ import annotations

import ast
import importlib
import json
import pickle
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement

from gpt2viz import GenerationSession, SamplingConfig, hardware, load_model
from gpt2viz import controller as c

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for d in ("gpt2viz", "tests", "bench", "scripts") for p in (ROOT / d).rglob("*.py")) + [ROOT / "app.py"]
NEWER_THAN_310 = re.compile(r"\b(import tomllib|from tomllib|typing import [^\n]*\b(Self|override|TypeAliasType)\b|StrEnum|datetime\.UTC|"
                            r"asyncio\.TaskGroup|itertools import [^\n]*batched|itertools\.batched|ExceptionGroup|except\*)")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_code_is_python_3_10(path):
    """Spaces run Python 3.10 or 3.12, this machine 3.11: the grammar of 3.10 and none of the newer stdlib names."""
    source = path.read_text()
    ast.parse(source, filename=str(path), feature_version=(3, 10))
    found = NEWER_THAN_310.search(source) if path != Path(__file__) else None  # this file names them
    assert found is None, f"{path.name} uses {found.group(0)!r}, which Python 3.10 lacks"


def requirements(python: str) -> dict[str, Requirement]:
    env = {"python_version": python, "python_full_version": python + ".0"}
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                out[req.name] = req
    return out


def test_requirements_choose_torch_by_python_version():
    here = requirements("3.11")
    assert str(here["torch"].specifier) == "==2.13.0" and "spaces" not in here
    for python in ("3.10", "3.12"):  # ZeroGPU: PyTorch 2.8-2.11
        spaces = requirements(python)
        version = str(spaces["torch"].specifier).removeprefix("==")
        assert (2, 8) <= tuple(int(x) for x in version.split(".")[:2]) <= (2, 11) and "spaces" in spaces
    front = (ROOT / "README.md").read_text().split("---")[1]
    assert re.search(r'python_version: "3\.(10|12)"', front)


def test_the_requirements_resolve_here_to_the_installed_cpu_torch():
    assert torch.version.cuda is None and torch.__version__.startswith("2.13.0")
    report = ROOT / ".pytest_cache" / "pip-report.json"
    report.parent.mkdir(exist_ok=True)
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "-q", "-r", str(ROOT / "requirements.txt"),
                          "--report", str(report)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    would = [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]]
    assert not [n for n in would if n == "torch" or n.startswith("nvidia")], would


@pytest.fixture
def with_spaces(monkeypatch):
    """hardware.py reloaded under a stand-in `spaces` module that records what it decorates."""
    decorated = []
    fake = types.ModuleType("spaces")

    def GPU(duration=None, **kwargs):  # noqa: N802 - the real decorator's name
        def wrap(fn):
            decorated.append((fn.__name__, duration))
            fn.zerogpu = True
            return fn
        return wrap
    fake.GPU = GPU
    monkeypatch.setitem(sys.modules, "spaces", fake)
    yield importlib.reload(hardware), decorated
    monkeypatch.delitem(sys.modules, "spaces")
    importlib.reload(hardware)


def test_under_spaces_only_the_outer_generation_loop_is_decorated_with_a_duration_from_the_work(with_spaces, monkeypatch):
    hw, decorated = with_spaces
    assert decorated == [("generate_on_gpu", hw.generation_seconds)]
    d = lambda model, n, prompt=20: hw.generation_seconds(model, list(range(prompt)), {}, n, {})  # noqa: E731
    assert 5 <= d("gpt2-large", 10) < d("gpt2-large", 100) < d("gpt2-xl", 100) <= hw.MAX_CALL_SECONDS
    assert d("gpt2-xl", 100) <= 20  # a short declaration: the quota is charged against it up front
    assert d("gpt2-xl", 5000) == hw.MAX_CALL_SECONDS
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert hw.zero_gpu() and hw.choose_device("auto") == "cpu"  # the GPU exists only inside the calls
    assert hw.offered("gpt2-xl", "cpu") and hw.on_gpu_per_call("gpt2-xl") and not hw.on_gpu_per_call("gpt2")
    monkeypatch.delenv("SPACES_ZERO_GPU")
    assert not hw.offered("gpt2-xl", "cpu") and hw.offered("gpt2-xl", "cuda") and not hw.on_gpu_per_call("gpt2-xl")


def test_devices_and_dtypes_are_checked():
    assert hardware.choose_device("cpu") == "cpu"
    assert hardware.choose_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(hardware.DeviceError, match="one of auto, cpu, cuda"):
        hardware.choose_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(hardware.DeviceError, match="no CUDA GPU"):
            hardware.choose_device("cuda")
    assert hardware.choose_dtype("bfloat16", "cuda") is torch.bfloat16
    with pytest.raises(hardware.DeviceError, match="for a GPU"):
        hardware.choose_dtype("float16", "cpu")


def test_replay_reads_tokens_chosen_elsewhere_as_if_drawn_here(tokenizer):
    model = load_model("tiny-shakespeare")
    cfg = SamplingConfig(seed=5, temperature=0.9, top_k=50)
    alone = GenerationSession(model, tokenizer, "ROMEO:\nBut soft", cfg, record=True)
    for _ in range(6):
        alone.step()
    alone.step(force=262)
    alone.read()
    tokens = [s.token_id for s in alone.steps]
    for cut in (1, 2, 7):
        other = GenerationSession(model, tokenizer, "ROMEO:\nBut soft", cfg, record=True)
        differ = other.replay(tokens[:cut])
        for s in alone.steps[cut:]:
            other.step(force=s.token_id if s.method == "forced" else None)
        other.read()
        assert other.ids == alone.ids and [s.method for s in other.steps] == [s.method for s in alone.steps]
        assert differ == (1 if cut == 7 else 0)  # the forced token is not what the draw gives
        np.testing.assert_allclose(other.records.logprobs, alone.records.logprobs, atol=1e-4)
        for a, b in zip(alone.steps, other.steps):
            assert a.prob_final == pytest.approx(b.prob_final, abs=1e-5) and a.rank == b.rank
        for p in range(len(alone.ids)):
            np.testing.assert_allclose(other.records.resid[p], alone.records.resid[p], atol=1e-4)


def test_a_generation_on_a_gpu_lent_per_call_gives_the_same_text_and_views(monkeypatch, tokenizer):
    """The ZeroGPU path, run here with the CPU standing in for the GPU: one call per generation, plain values
    across it, and the same tokens, methods and views as the engine's own generation."""
    model = load_model("tiny-shakespeare")

    class One:
        default, tokenizer = "tiny-shakespeare", None

        def names(self):
            return [self.default]

        def get(self, name):
            return model
    models = One()
    models.tokenizer = tokenizer
    settings = [0.8, 40, 0.95, 1.1, 12, 7]
    prompt = "ROMEO:\nBut soft, what light"
    plain = c.Controller(models, c.Sessions(models))
    *_, last = plain.stream(None, "tiny-shakespeare", prompt, settings, c.Selection())
    expected = plain.sessions.get(last.state, c.sampling_config(*settings)).session

    calls = []
    inner = hardware.generate_on_gpu

    def watched(*args):
        assert pickle.loads(pickle.dumps(args)) == args  # what crosses into the GPU's process: plain values
        assert not any(isinstance(a, torch.Tensor) for a in args)
        calls.append(args)
        for token in inner(*args):
            assert type(token) is int
            yield token
    monkeypatch.setattr(hardware, "on_gpu_per_call", lambda name: True)
    monkeypatch.setattr(hardware, "generate_on_gpu", watched)
    monkeypatch.setitem(hardware.GPU_MODELS, "tiny-shakespeare", model)
    monkeypatch.setattr(hardware, "TOKENIZER", [tokenizer])
    gpu = c.Controller(models, c.Sessions(models))
    pages = list(gpu.stream(None, "tiny-shakespeare", prompt, settings, c.Selection()))
    assert len(calls) == 1 and calls[0][3] == 12  # one call: the whole generation
    assert "Generating on the GPU" in pages[0].status and len(pages) == 13
    got = gpu.sessions.get(pages[-1].state, c.sampling_config(*settings)).session
    assert got.ids == expected.ids and all(s.method == "sampled" for s in got.steps)
    np.testing.assert_allclose(got.records.logprobs[1:], expected.records.logprobs[1:], atol=1e-4)
    view = gpu.select(pages[-1].state, settings, c.Selection(position=len(got.ids) - 3, tab="chosen")).views["chosen"]
    same = plain.select(last.state, settings, c.Selection(position=len(got.ids) - 3, tab="chosen")).views["chosen"]
    np.testing.assert_allclose(view.data[1].x, same.data[1].x, atol=2e-4)


OPENMP_WORKERS = """
import os, time, torch
from gpt2viz.hardware import release_openmp_workers
torch.set_num_threads(2)
x = torch.randn(4_000_000)
expected = float(x.double().sum())
float((x * 2).sum())  # a parallel region on this thread: libgomp starts a worker for it
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
released = release_openmp_workers()
deadline = time.monotonic() + 10
while threads() >= before and time.monotonic() < deadline:
    time.sleep(0.01)
after = threads()
again = float(x.double().sum())  # the next parallel region starts workers afresh and computes as before
print(released, before, after, again == expected)
"""


def test_the_thread_that_loaded_the_model_gives_its_openmp_workers_back():
    """After `release_openmp_workers`, the thread's OpenMP worker is gone (one thread fewer in the process), and parallel
    regions still compute the same sums: the engine's thread is then the only one with a team (hardware.py)."""
    released, before, after, same = subprocess.run([sys.executable, "-c", OPENMP_WORKERS], cwd=ROOT, capture_output=True, text=True,
                                                   check=True).stdout.split()
    assert released == "True" and same == "True"
    assert int(after) == int(before) - 1
