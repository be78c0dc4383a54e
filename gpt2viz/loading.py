"""Loading GPT-2 checkpoints: from the Hugging Face Hub, a local folder or file, or the bundled model.

Only safetensors files, or `pytorch_model.bin` read with `torch.load(weights_only=True)`,
are ever read: nothing is unpickled beyond that. Every mismatch raises a `CheckpointError`
that names the problem.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .model import GPT2, ConfigError, GPT2Config

ASSETS = Path(__file__).resolve().parent.parent / "assets"

HUB_MODELS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
BUNDLED_MODELS = {"tiny-shakespeare": ASSETS / "tiny-shakespeare", "toy-induction": ASSETS / "toy-induction"}

# Hugging Face stores these four as Conv1D, [in, out]; nn.Linear wants [out, in].
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(masked_)?bias$")  # old causal-mask buffers, not weights


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as GPT-2: the message says exactly why."""


class HubUnavailableError(CheckpointError):
    """The model is not cached locally and the Hugging Face Hub could not be reached."""


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    local_files_only: bool = False,
) -> GPT2:
    """Load a GPT-2 in eval mode.

    `name_or_path`: a Hub name (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `distilgpt2`),
    a bundled name (`tiny-shakespeare`), a folder holding `config.json` and `model.safetensors`
    (or `pytorch_model.bin`), or a `.safetensors` / `.bin` file with `config.json` beside it.
    `local_files_only`: use the Hugging Face cache and never ask the Hub.
    """
    config_path, weights_path = resolve_checkpoint(name_or_path, local_files_only)
    cfg = read_config(config_path)
    state = convert_state_dict(read_weights(weights_path), cfg)
    model = GPT2(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def available_models() -> list[str]:
    """Names accepted by `load_model` besides paths: Hub models, then bundled ones that are present."""
    return list(HUB_MODELS) + [name for name, path in BUNDLED_MODELS.items() if (path / "config.json").exists()]


def resolve_checkpoint(name_or_path: str | os.PathLike, local_files_only: bool = False) -> tuple[Path, Path]:
    """Find `(config.json, weights file)` for a name or path, downloading from the Hub if needed."""
    key = str(name_or_path)
    if key in HUB_MODELS:
        return download_from_hub(HUB_MODELS[key], local_files_only)
    if key in BUNDLED_MODELS:
        return _local_checkpoint(BUNDLED_MODELS[key])
    path = Path(key).expanduser()
    if not path.exists():
        known = ", ".join(list(HUB_MODELS) + list(BUNDLED_MODELS))
        raise CheckpointError(f"{key!r} is neither a known model name ({known}) nor an existing file or folder")
    return _local_checkpoint(path)


def _local_checkpoint(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        config = path / "config.json"
        candidates = [path / "model.safetensors", path / "pytorch_model.bin"]
        weights = next((c for c in candidates if c.is_file()), None)
        if weights is None:
            raise CheckpointError(f"folder {path} holds neither model.safetensors nor pytorch_model.bin")
    else:
        if path.suffix not in (".safetensors", ".bin"):
            raise CheckpointError(f"{path} is not a .safetensors or .bin weights file")
        config, weights = path.parent / "config.json", path
    if not config.is_file():
        raise CheckpointError(f"no config.json next to the weights in {config.parent}")
    return config, weights


def download_from_hub(repo_id: str, local_files_only: bool = False) -> tuple[Path, Path]:
    """Fetch `config.json` and `model.safetensors` of a Hub repo into the standard HF cache.

    Honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE; with the Hub unreachable, cached
    files are used. Raises `HubUnavailableError` when neither works.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        config = hf_hub_download(repo_id, "config.json", local_files_only=local_files_only)
        try:
            weights = hf_hub_download(repo_id, "model.safetensors", local_files_only=local_files_only)
        except EntryNotFoundError:
            weights = hf_hub_download(repo_id, "pytorch_model.bin", local_files_only=local_files_only)
    except LocalEntryNotFoundError as e:
        raise HubUnavailableError(
            f"could not download {repo_id} from the Hugging Face Hub (no connection, or HF_HUB_OFFLINE is set) "
            f"and it is not in the local cache ({_hub_cache_dir()}). Connect to the internet, or point at a local "
            f"checkpoint: load_model('/path/to/folder') with config.json and model.safetensors, or use the "
            f"bundled offline model 'tiny-shakespeare'. ({e.__class__.__name__})"
        ) from e
    except OSError as e:  # network errors surface as requests/httpx OSError subclasses
        raise HubUnavailableError(
            f"could not reach the Hugging Face Hub for {repo_id}: {e}. Point at a local checkpoint folder "
            f"(config.json + model.safetensors) or use the bundled offline model 'tiny-shakespeare'."
        ) from e
    return Path(config), Path(weights)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection quickly (False when HF_HUB_OFFLINE is set)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def read_config(path: Path) -> GPT2Config:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read config {path}: {e}") from e
    try:
        return GPT2Config.from_hf_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except TypeError as e:
        raise CheckpointError(f"{path}: not a GPT-2 config ({e})") from e


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, or a `.bin` with `weights_only=True` (never a full unpickle)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, zip and unpickling errors have no common base
        raise CheckpointError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors (a state_dict)")
    return state


def expected_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Parameter shapes in the Hub's layout (Conv1D weights as [in, out]), keyed by gpt2viz names."""
    C, M = cfg.n_embd, cfg.d_mlp
    shapes = {"wte.weight": (cfg.vocab_size, C), "wpe.weight": (cfg.n_positions, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        shapes.update({
            p + "ln_1.weight": (C,), p + "ln_1.bias": (C,), p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
            p + "attn.c_attn.weight": (C, 3 * C), p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
            p + "mlp.c_fc.weight": (C, M), p + "mlp.c_fc.bias": (M,),
            p + "mlp.c_proj.weight": (M, C), p + "mlp.c_proj.bias": (C,),
        })
    return shapes


_BLOCK_KEY = re.compile(r"^h\.(\d+)\.")


def convert_state_dict(state: dict[str, torch.Tensor], cfg: GPT2Config) -> dict[str, torch.Tensor]:
    """Map a Hub GPT-2 state dict (either key layout) onto gpt2viz's parameter names.

    Strips the `transformer.` prefix, drops `lm_head.weight` (tied to `wte`) and the old
    mask buffers, renames `h.{i}` to `blocks.{i}`, and transposes the Conv1D weights.
    """
    renamed: dict[str, torch.Tensor] = {}
    original: dict[str, str] = {}
    for key, tensor in state.items():
        name = key.removeprefix("transformer.")
        if name == "lm_head.weight" or _MASK_BUFFER.match(name):
            continue
        name = _BLOCK_KEY.sub(r"blocks.\1.", name)
        if name in renamed:
            raise CheckpointError(f"checkpoint holds {key!r} twice (with and without the 'transformer.' prefix)")
        renamed[name], original[name] = tensor, key

    shapes = expected_shapes(cfg)
    missing = [k for k in shapes if k not in renamed]
    unexpected = [original[k] for k in renamed if k not in shapes]
    if missing:
        shown = [_hub_name(k) for k in missing]
        raise CheckpointError(f"checkpoint is missing {len(missing)} key(s): {', '.join(shown[:10])}" + (" ..." if len(shown) > 10 else ""))
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected key(s): {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else ""))
    out = {}
    for name, shape in shapes.items():
        tensor = renamed[name]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"wrong shape for {original[name]!r}: expected {list(shape)} (from config.json), found {list(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{original[name]!r} holds {tensor.dtype} values, not floating point weights")
        out[name] = tensor.t().contiguous() if name.endswith(CONV1D_SUFFIXES) else tensor
    return out


def _hub_name(name: str) -> str:
    return re.sub(r"^blocks\.(\d+)\.", r"h.\1.", name)


def to_hub_state_dict(model: GPT2) -> dict[str, torch.Tensor]:
    """gpt2viz parameters in the Hub layout (`transformer.` prefix, Conv1D as [in, out])."""
    out = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        out["transformer." + _hub_name(name)] = tensor.contiguous()
    return out


def save_checkpoint(model: GPT2, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write `config.json` + `model.safetensors` in the layout Hugging Face loads."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_hub_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model.cfg.to_hf_dict(), indent=2) + "\n")
    return folder
