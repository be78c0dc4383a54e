"""Hook points and the activation cache.

Every activation that gpt2viz can observe passes through a `HookPoint`, an identity
module. Its name comes from the module tree (`blocks.3.attn.pattern`), so names are
found, never declared twice. A hook is a function `fn(activation, hook) -> tensor | None`;
returning a tensor replaces the activation (ablation, patching). Hooks are only ever
attached inside a `with model.hooks(...)` block and removed in `finally`.

Hooks belong to the thread that attached them: a model shared by several users (web
server threads) runs each user's hooks only in that user's forward passes.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]

# Short names for the per-layer hook points: cache["pattern", 3] -> "blocks.3.attn.pattern".
LAYER_HOOK_TEMPLATES = {
    "resid_pre": "blocks.{}.resid_pre",
    "resid_mid": "blocks.{}.resid_mid",
    "resid_post": "blocks.{}.resid_post",
    "attn_out": "blocks.{}.attn_out",
    "mlp_out": "blocks.{}.mlp_out",
    "q": "blocks.{}.attn.q",
    "k": "blocks.{}.attn.k",
    "v": "blocks.{}.attn.v",
    "attn_scores": "blocks.{}.attn.scores",
    "scores": "blocks.{}.attn.scores",
    "pattern": "blocks.{}.attn.pattern",
    "z": "blocks.{}.attn.z",
    "mlp_pre": "blocks.{}.mlp.pre",
    "mlp_post": "blocks.{}.mlp.post",
    "pre": "blocks.{}.mlp.pre",
    "post": "blocks.{}.mlp.post",
}


_local = threading.local()


def _thread_hooks() -> dict[int, list[HookFn]]:
    """This thread's hooks: {id(hook point): [fn, ...]}."""
    hooks = getattr(_local, "hooks", None)
    if hooks is None:
        hooks = _local.hooks = {}
    return hooks


class HookPoint(nn.Module):
    """Identity module that runs the hooks attached to it (in this thread). `name` is set by the model."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""

    @property
    def fns(self) -> list[HookFn]:
        """The hooks attached here by the current thread (a live list)."""
        return _thread_hooks().setdefault(id(self), [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fns = _thread_hooks().get(id(self))
        if not fns:
            return x
        for fn in list(fns):
            out = fn(x, self)
            if out is not None:
                if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                    raise ValueError(
                        f"hook at {self.name} returned {type(out).__name__}"
                        f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}; "
                        f"expected a tensor of shape {tuple(x.shape)} or None"
                    )
                x = out
        return x

    # Called a dozen times per layer: skip nn.Module's call machinery (torch's own module hooks are not used).
    __call__ = forward

    @property
    def observed(self) -> bool:
        return bool(_thread_hooks().get(id(self)))

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r})"


def resolve_name(key: str | tuple, n_layer: int) -> str:
    """Turn `"blocks.3.attn.pattern"`, `("pattern", 3)` or `("pattern", -1)` into a full hook name."""
    if isinstance(key, str):
        return key
    if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str) and isinstance(key[1], int):
        short, layer = key
        if short not in LAYER_HOOK_TEMPLATES:
            raise KeyError(f"unknown per-layer hook {short!r}; known: {sorted(LAYER_HOOK_TEMPLATES)}")
        if not -n_layer <= layer < n_layer:
            raise IndexError(f"layer {layer} out of range for a model with {n_layer} layers")
        return LAYER_HOOK_TEMPLATES[short].format(layer % n_layer)
    raise KeyError(f"cannot resolve hook key {key!r}: use a full name or (short_name, layer)")


class ActivationCache:
    """Activations saved by `run_with_cache`, keyed by hook name.

    Lookups: `cache["blocks.3.attn.pattern"]`, `cache["pattern", 3]`, `cache["pattern", -1]`.
    `cache.stack("pattern")` stacks one per-layer activation over layers -> `[layer, ...]`.
    """

    def __init__(self, activations: dict[str, torch.Tensor], n_layer: int) -> None:
        self._acts = activations
        self.n_layer = n_layer

    def __getitem__(self, key: str | tuple) -> torch.Tensor:
        name = resolve_name(key, self.n_layer)
        if name not in self._acts:
            raise KeyError(f"{name!r} was not captured; captured: {len(self._acts)} names, e.g. {list(self._acts)[:5]}")
        return self._acts[name]

    def __contains__(self, key: str | tuple) -> bool:
        try:
            return resolve_name(key, self.n_layer) in self._acts
        except (KeyError, IndexError):
            return False

    def __len__(self) -> int:
        return len(self._acts)

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def keys(self) -> Iterable[str]:
        return self._acts.keys()

    def items(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self._acts.items()

    def stack(self, short: str) -> torch.Tensor:
        """Stack a per-layer activation over all layers: `[layer, *activation_shape]`."""
        return torch.stack([self[short, layer] for layer in range(self.n_layer)])
