"""Checkpoint loading: Hub names, local layouts, and a precise error for every malformed input."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2viz import CheckpointError, load_model

ROOT = Path(__file__).resolve().parent.parent


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def write_variant(src: Path, dst: Path, transform, filename="model.safetensors", config=None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    state = transform(load_file(str(src / "model.safetensors")))
    if filename.endswith(".bin"):
        torch.save(state, dst / filename)
    else:
        save_file(state, str(dst / filename))
    cfg = json.loads((src / "config.json").read_text())
    if config:
        cfg = config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def strip_prefix(state):
    return {k.removeprefix("transformer."): v for k, v in state.items()}


def with_buffers_and_lm_head(state):
    """The layout of the original GPT-2 upload: no prefix, mask buffers, explicit lm_head."""
    out = strip_prefix(state)
    n_layer = 1 + max(int(k.split(".")[1]) for k in out if k.startswith("h."))
    n_pos = out["wpe.weight"].shape[0]
    for i in range(n_layer):
        out[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
        out[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    out["lm_head.weight"] = out["wte.weight"].clone()
    return out


def test_every_key_layout_loads_to_identical_parameters(small_checkpoint, tmp_path):
    reference = params(load_model(small_checkpoint))
    variants = {
        "no-prefix": write_variant(small_checkpoint, tmp_path / "a", strip_prefix),
        "buffers+lm_head": write_variant(small_checkpoint, tmp_path / "b", with_buffers_and_lm_head),
        "prefixed+lm_head": write_variant(small_checkpoint, tmp_path / "c", lambda s: {**s, "lm_head.weight": s["transformer.wte.weight"].clone()}),
        "bin": write_variant(small_checkpoint, tmp_path / "d", with_buffers_and_lm_head, filename="pytorch_model.bin"),
    }
    single_file = write_variant(small_checkpoint, tmp_path / "e", strip_prefix, filename="weights.safetensors") / "weights.safetensors"
    for name, path in list(variants.items()) + [("file", single_file)]:
        loaded = params(load_model(path))
        assert loaded.keys() == reference.keys(), name
        for key in reference:
            assert torch.equal(loaded[key], reference[key]), (name, key)


def test_conv1d_weights_are_transposed(small_checkpoint):
    raw = load_file(str(small_checkpoint / "model.safetensors"))
    model = load_model(small_checkpoint)
    w = raw["transformer.h.0.attn.c_attn.weight"]  # Conv1D: [in, out]
    assert torch.equal(model.blocks[0].attn.c_attn.weight, w.T)
    assert torch.equal(model.blocks[0].mlp.c_proj.weight, raw["transformer.h.0.mlp.c_proj.weight"].T)


def test_model_is_in_eval_mode_with_requested_dtype(small_checkpoint):
    model = load_model(small_checkpoint, dtype=torch.float64)
    assert not model.training
    assert model.wte.weight.dtype == torch.float64


def drop(key):
    return lambda s: {k: v for k, v in s.items() if k != key}


@pytest.mark.parametrize(
    "transform, config, message",
    [
        (drop("transformer.h.1.mlp.c_fc.bias"), None, r"missing 1 key\(s\): h\.1\.mlp\.c_fc\.bias"),
        (lambda s: {**s, "transformer.h.0.attn.rotary": torch.zeros(3)}, None, r"unexpected key\(s\): transformer\.h\.0\.attn\.rotary"),
        (lambda s: {**s, "transformer.h.2.mlp.c_fc.weight": torch.zeros(128, 256)}, None,
         r"wrong shape for 'transformer\.h\.2\.mlp\.c_fc\.weight': expected \[128, 512\] \(from config.json\), found \[128, 256\]"),
        (lambda s: s, lambda c: {**c, "model_type": "bert"}, r"model_type 'bert', not 'gpt2'"),
        (lambda s: s, lambda c: {**c, "activation_function": "relu"}, r"activation_function 'relu' is not GPT-2's tanh GELU"),
        (lambda s: s, lambda c: {**c, "n_embd": 130}, r"n_embd \(130\) must be divisible by n_head \(4\)"),
        (lambda s: s, lambda c: {k: v for k, v in c.items() if k != "n_layer"}, r"lacks required GPT-2 field\(s\): n_layer"),
        (lambda s: s, lambda c: {**c, "scale_attn_by_inverse_layer_idx": True}, r"scale_attn_by_inverse_layer_idx=True"),
        (lambda s: {**s, "transformer.wte.weight": s["transformer.wte.weight"].long()}, None, r"not floating point"),
    ],
    ids=["missing", "unexpected", "shape", "not-gpt2", "activation", "heads", "no-n_layer", "variant", "int-weights"],
)
def test_malformed_checkpoints_name_the_problem(small_checkpoint, tmp_path, transform, config, message):
    folder = write_variant(small_checkpoint, tmp_path / "bad", transform, config=config)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


def test_unreadable_files_are_refused_with_their_path(small_checkpoint, tmp_path):
    folder = tmp_path / "garbage"
    folder.mkdir()
    shutil.copy(small_checkpoint / "config.json", folder)
    (folder / "model.safetensors").write_bytes(b"\x00\x01 this is not safetensors")
    with pytest.raises(CheckpointError, match=r"cannot read weights file .*model\.safetensors"):
        load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"cannot read config .*config\.json"):
        load_model(folder)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/gpt2viz-pwned",))


def test_pickles_beyond_weights_only_are_never_executed(small_checkpoint, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(small_checkpoint / "config.json", folder)
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"wte.weight": Evil()}, f)
    Path("/tmp/gpt2viz-pwned").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="cannot read weights file"):
        load_model(folder)
    assert not Path("/tmp/gpt2viz-pwned").exists()


def test_missing_paths_and_config(small_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="neither a known model name .*gpt2.* nor an existing file"):
        load_model(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor pytorch_model.bin"):
        load_model(tmp_path / "empty")
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(small_checkpoint / "model.safetensors", lone)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(lone)
    with pytest.raises(CheckpointError, match="not a .safetensors or .bin"):
        load_model(small_checkpoint / "config.json")


def run_loader(code: str, env: dict) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)


def test_hub_names_resolve_through_the_standard_hf_cache(small_checkpoint, tmp_path):
    """`gpt2` is fetched with huggingface_hub; a populated cache works with HF_HUB_OFFLINE=1."""
    snapshot = tmp_path / "hf" / "hub" / "models--openai-community--gpt2" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(small_checkpoint / f, snapshot / f)
    refs = snapshot.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    code = "from gpt2viz import load_model; m = load_model('gpt2'); print(m.cfg.n_layer, m.cfg.n_embd)"
    result = run_loader(code, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3", "128"]


def test_unreachable_hub_with_empty_cache_says_what_to_do(tmp_path):
    code = (
        "from gpt2viz import load_model, HubUnavailableError\n"
        "try:\n    load_model('distilgpt2')\nexcept HubUnavailableError as e:\n    print(e)\n"
    )
    result = run_loader(code, {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "distilbert/distilgpt2" in result.stdout
    assert "not in the local cache" in result.stdout
    assert "point at a local checkpoint" in result.stdout


def test_local_files_only_never_touches_the_network(tmp_path, monkeypatch):
    """What the app does when the Hub is unreachable: look in the cache only, and fail at once."""
    import socket

    from gpt2viz import HubUnavailableError

    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(HubUnavailableError, match="not in the local cache"):
        load_model("gpt2", local_files_only=True)
    assert attempts == []
