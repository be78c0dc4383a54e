"""Where each model runs: the CPU, a CUDA GPU, or Hugging Face's ZeroGPU (a GPU lent per call).

One rule, `placement`:
- `--device cpu` (the default without a GPU): every model on the CPU; gpt2-large and gpt2-xl are not offered
  (too slow for a class on 2 cores).
- `--device cuda` (the default with a GPU): every model on the GPU, all of them offered.
- On ZeroGPU (the `SPACES_ZERO_GPU` environment variable, set by Spaces): the small models stay on the CPU,
  so a class spends none of its GPU quota on them; gpt2-large and gpt2-xl are offered, and their
  generations run on the GPU inside `@spaces.GPU` (`generate_on_gpu`): one call per generation, the outer
  loop, with a declared duration computed from the work (`generation_seconds`). Only token ids and settings
  cross into the GPU's process and only token ids come back; the page's views read the text on the CPU.

`spaces.GPU` is used where the `spaces` package is installed (it is on Spaces) and is effect-free outside
ZeroGPU; elsewhere `gpu` is the identity.

On the CPU, one thread runs the model for everyone (`engine.py`), and it should be the only thread with a team of
OpenMP workers: `release_openmp_workers` (below) gives back those of a thread that will run no more model work.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
from collections.abc import Callable, Iterator

import torch

GPU_ONLY_MODELS = ("gpt2-large", "gpt2-xl")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# seconds per generated token on a ZeroGPU slice (a margin over what the model needs), and the fixed cost of a
# call (the process, the prompt's pass); the declared duration is what the quota is charged against up front
SECONDS_PER_TOKEN = {"gpt2-large": 0.05, "gpt2-xl": 0.08}
CALL_SECONDS = 5
MAX_CALL_SECONDS = 120


class DeviceError(RuntimeError):
    """A device was asked for that this machine does not have."""


def release_openmp_workers() -> bool:
    """End the OpenMP worker threads that the calling thread's parallel regions started (libgomp, torch's OpenMP on
    Linux: `omp_pause_resource_all(omp_pause_hard)`); its next parallel region would start new ones. Returns
    whether there was a libgomp to ask and it agreed.

    Call it on the thread that loaded the models, once they are loaded: libgomp keeps a team of workers for every
    thread that has run a parallel region, and once it manages more threads than there are cores its workers spin
    100 times instead of ~300,000 before they sleep. Then each of the hundreds of small parallel regions of the
    engine's pass wakes a sleeping worker: a decode pass on the engine's thread took 20-25% longer on 2 cores while
    the main thread's idle team lived (bench/README.md)."""
    libgomp = next((ctypes.CDLL(path) for path in _loaded_libraries() if os.path.basename(path).startswith("libgomp")), None)
    if libgomp is None or not hasattr(libgomp, "omp_pause_resource_all"):
        return False
    return libgomp.omp_pause_resource_all(2) == 0  # omp_pause_hard


def _loaded_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if line.rstrip().endswith(".so") or ".so." in line})
    except OSError:  # not Linux: no libgomp to ask
        return []


def zero_gpu() -> bool:
    """Whether this process runs on a ZeroGPU Space (Spaces sets SPACES_ZERO_GPU=true there)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def choose_device(flag: str = "auto") -> str:
    """"cpu" or "cuda" for `--device auto|cpu|cuda` (auto: cuda when torch sees a GPU; ZeroGPU: cpu, since
    its GPU exists only inside `@spaces.GPU` calls)."""
    if flag not in DEVICES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICES)}, got {flag!r}")
    if flag == "cuda" and not zero_gpu() and not torch.cuda.is_available():
        raise DeviceError("--device cuda: this machine has no CUDA GPU that torch can use (torch.cuda.is_available() is False)")
    if flag == "auto":
        return "cpu" if zero_gpu() else ("cuda" if torch.cuda.is_available() else "cpu")
    return "cpu" if zero_gpu() else flag


def engine_process(flag: str, device: str) -> bool:
    """Whether the engine runs in a process of its own (`--engine-process auto|on|off`, gpt2viz/worker.py).
    auto: on the CPU, where the web server's Python and the engine's no longer share one interpreter lock
    (bench/README.md); not on ZeroGPU, whose `@spaces.GPU` calls must be made from the process Spaces
    started, nor on a GPU, where it has not been measured."""
    if flag not in ("auto", "on", "off"):
        raise DeviceError(f"--engine-process must be auto, on or off, got {flag!r}")
    if flag == "on" and zero_gpu():
        raise DeviceError("--engine-process on: not on ZeroGPU (its GPU calls are made from the web process)")
    return flag == "on" or (flag == "auto" and device == "cpu" and not zero_gpu())


def choose_dtype(name: str, device: str) -> torch.dtype:
    """The weights' dtype: float32 on the CPU always; float16 or bfloat16 on a GPU when asked."""
    if name not in DTYPES:
        raise DeviceError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if device == "cpu" and name != "float32":
        raise DeviceError("--dtype float16 / bfloat16 is for a GPU: on the CPU the model runs in float32")
    return DTYPES[name]


def offered(name: str, device: str) -> bool:
    """Whether the page offers a Hub model: the largest only where a GPU can run them."""
    return name not in GPU_ONLY_MODELS or device == "cuda" or zero_gpu()


def on_gpu_per_call(name: str) -> bool:
    """Whether a model's generations run inside `@spaces.GPU` calls (the large models on ZeroGPU)."""
    return zero_gpu() and name in GPU_ONLY_MODELS


def generation_seconds(model_name: str, prompt_ids: list[int], settings: dict, n_tokens: int, forced: dict) -> int:
    """The duration `generate_on_gpu` declares for a call: what the quota is checked against before it runs."""
    per = SECONDS_PER_TOKEN.get(model_name, 0.05)
    return min(MAX_CALL_SECONDS, int(CALL_SECONDS + per * (n_tokens + len(prompt_ids) / 32)) + 1)


def gpu(duration: Callable[..., int]) -> Callable:
    """`spaces.GPU(duration=duration)` where the `spaces` package is installed, else the identity."""
    try:
        import spaces  # noqa: PLC0415 - present on Spaces only
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


GPU_MODELS: dict[str, object] = {}  # name -> the GPT2 placed on cuda at startup (ZeroGPU wants models placed there)
TOKENIZER: list = []


def place_for_gpu_calls(name: str, model, tokenizer) -> None:
    """Keep a CUDA copy of `model` for `generate_on_gpu` (on ZeroGPU, moved at startup: its CUDA is emulated
    outside `@spaces.GPU` and real inside)."""
    GPU_MODELS[name] = model.to("cuda")
    TOKENIZER[:] = [tokenizer]


@gpu(duration=generation_seconds)
def generate_on_gpu(model_name: str, prompt_ids: list[int], settings: dict, n_tokens: int, forced: dict) -> Iterator[int]:
    """Generate up to `n_tokens` after `prompt_ids` with the model's CUDA copy and the page's settings (a
    `SamplingConfig`'s fields), `forced` step index -> token; yields each token id as it is chosen (plain ints:
    they are pickled from the GPU's process on every yield). Stops at the end of text or of the context."""
    from .generation import GenerationSession  # noqa: PLC0415 - the GPU's process imports what it needs
    from .sampling import SamplingConfig  # noqa: PLC0415

    model = GPU_MODELS[model_name]
    config = SamplingConfig(**settings)
    session = GenerationSession(model, TOKENIZER[0], list(prompt_ids), dataclasses.replace(config, max_new_tokens=n_tokens))
    with torch.no_grad():
        for i in range(n_tokens):
            if session.room_left <= 0:
                return
            step = session.step(force=forced.get(i))
            yield int(step.token_id)
            if step.finish_reason is not None:
                return
