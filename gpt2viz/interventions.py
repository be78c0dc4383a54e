"""Interventions: switch parts of GPT-2 off, scale them, patch them from another text, or steer them.

An intervention is a small frozen value (it goes into share links and session state):

    AblateHeads(layer=1, heads=(0, 2))                 # z of those heads set to 0 ("zero") or their mean ("mean")
    AblateAttn(layer=3, mode="mean")                  # the attention layer's output (attn_out)
    AblateMLP(layer=3)                                 # the MLP layer's output (mlp_out)
    AblateNeurons(layer=5, neurons=(12, 700))          # chosen MLP neurons (mlp.post)
    ScaleHead(layer=0, head=0, factor=0.5)             # one head's z times a factor
    Patch(hook="blocks.4.resid_pre", source="...")     # that activation taken from the run on another text
    Steer(layer=6, plus="Love", minus="Hate", scale=4) # add scale x (mean resid_pre of plus - of minus)
    AddVector(layer=6, vector=(...))                   # add any vector to resid_pre of a layer

`resolve(interventions, model, tokenizer)` checks them against the model and turns them into a
`Plan`: per hook point, the edits to make there, in the order given (they compose). A plan runs
in both forward bodies as hooks (`Plan.hooks`: the module path and the flat decode step call the
same hook points) and in `GPT2.forward_ragged` (`Plan.apply`, per sequence, for the engine).
Every edit is a function of the activation and the absolute positions it covers, so a text read
in one pass or in chunks or a token at a time gets the same edits.

Mean ablation replaces an activation by its mean over the positions of `REFERENCE_TEXT` read by
the unmodified model (cached per model). Patch sources are read by the unmodified model too.
Edits on the residual stream entering layer l >= 1 are made where it leaves layer l - 1 (the same
tensor), so that what a recording session captures is the stream the next layer really reads.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch

from .hooks import LAYER_HOOK_TEMPLATES
from .model import GPT2
from .tokenizer import encode

MODES = ("zero", "mean")
MAX_TEXT_CHARS = 4000  # a patch source or steering prompt; longer texts are refused, not cut
MAX_INTERVENTIONS = 64

REFERENCE_TEXT = (
    "The museum opens at nine in the morning and closes at five. Visitors can walk through rooms of old maps, "
    "tools and paintings, and a guide explains how the town grew from a small market by the river into a busy "
    "city. In the afternoon, children from the local school came to draw the boats, and their teacher asked "
    "them to write a short story about a sailor who found a strange island. Most of them wrote about storms, "
    "treasure and friendship; one wrote about a cat that learned to read the stars."
)
"""The text whose mean activations mean ablation uses (about 100 tokens of plain English prose)."""

# Hook points whose patching a recording session cannot show faithfully: it recomputes attention from the
# residual stream and the cached keys, and the lens from the residual stream (the page's sessions record).
UNRECORDABLE = ("q", "scores", "pattern", "ln_final", "logits")


class InterventionError(ValueError):
    """An intervention that is malformed, or that does not fit the model it is applied to."""


def _int(owner: str, name: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InterventionError(f"{owner}.{name} must be an integer >= {low}, got {value!r}")
    return value


def _ints(owner: str, name: str, values, low: int = 0) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not values:
        raise InterventionError(f"{owner}.{name} must be a non-empty list of integers, got {values!r}")
    out = tuple(_int(owner, name, v, low) for v in values)
    if len(set(out)) != len(out):
        raise InterventionError(f"{owner}.{name} lists a value twice: {list(out)}")
    return out


def _float(owner: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InterventionError(f"{owner}.{name} must be a finite number, got {value!r}")
    return float(value)


def _mode(owner: str, value) -> str:
    if value not in MODES:
        raise InterventionError(f"{owner}.mode must be one of {MODES}, got {value!r}")
    return value


def _text(owner: str, name: str, value, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty) or len(value) > MAX_TEXT_CHARS:
        raise InterventionError(f"{owner}.{name} must be a text of 1 to {MAX_TEXT_CHARS} characters, got {value!r:.60}")
    return value


@dataclass(frozen=True)
class AblateHeads:
    """Zero- or mean-ablate heads of one layer: their `z` (output before c_proj) at every position."""

    layer: int
    heads: tuple[int, ...]
    mode: str = "zero"

    def __post_init__(self) -> None:
        _int("AblateHeads", "layer", self.layer)
        object.__setattr__(self, "heads", _ints("AblateHeads", "heads", self.heads))
        _mode("AblateHeads", self.mode)


@dataclass(frozen=True)
class AblateAttn:
    """Zero- or mean-ablate a whole attention layer's output (`attn_out`)."""

    layer: int
    mode: str = "zero"

    def __post_init__(self) -> None:
        _int("AblateAttn", "layer", self.layer)
        _mode("AblateAttn", self.mode)


@dataclass(frozen=True)
class AblateMLP:
    """Zero- or mean-ablate a whole MLP layer's output (`mlp_out`)."""

    layer: int
    mode: str = "zero"

    def __post_init__(self) -> None:
        _int("AblateMLP", "layer", self.layer)
        _mode("AblateMLP", self.mode)


@dataclass(frozen=True)
class AblateNeurons:
    """Zero- or mean-ablate chosen MLP neurons (`mlp.post`, after the GELU)."""

    layer: int
    neurons: tuple[int, ...]
    mode: str = "zero"

    def __post_init__(self) -> None:
        _int("AblateNeurons", "layer", self.layer)
        object.__setattr__(self, "neurons", _ints("AblateNeurons", "neurons", self.neurons))
        _mode("AblateNeurons", self.mode)


@dataclass(frozen=True)
class ScaleHead:
    """Multiply one head's `z` by `factor` (0 is zero ablation, 1 changes nothing)."""

    layer: int
    head: int
    factor: float

    def __post_init__(self) -> None:
        _int("ScaleHead", "layer", self.layer)
        _int("ScaleHead", "head", self.head)
        object.__setattr__(self, "factor", _float("ScaleHead", "factor", self.factor))


@dataclass(frozen=True)
class Patch:
    """Replace the activation at `hook` by its value in the unmodified model's run on `source`, at
    `positions` (default: every position the source has). Positions past the end of the source
    are refused when given, and left alone by default."""

    hook: str
    source: str
    positions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.hook, str) or not self.hook:
            raise InterventionError(f"Patch.hook must be a hook point's name, got {self.hook!r}")
        _text("Patch", "source", self.source)
        if self.positions is not None:
            object.__setattr__(self, "positions", _ints("Patch", "positions", self.positions))


@dataclass(frozen=True)
class Steer:
    """Add `scale` x (mean residual stream entering `layer` on `plus` - the same on `minus`), both read
    by the unmodified model, at every position: "steering" with the difference of two prompts."""

    layer: int
    plus: str
    minus: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        _int("Steer", "layer", self.layer)
        _text("Steer", "plus", self.plus)
        _text("Steer", "minus", self.minus)
        object.__setattr__(self, "scale", _float("Steer", "scale", self.scale))


@dataclass(frozen=True)
class AddVector:
    """Add `scale` x `vector` (`[d_model]`) to the residual stream entering `layer`, at every position."""

    layer: int
    vector: tuple[float, ...]
    scale: float = 1.0

    def __post_init__(self) -> None:
        _int("AddVector", "layer", self.layer)
        if isinstance(self.vector, (str, bytes)) or not isinstance(self.vector, (list, tuple)) or not self.vector:
            raise InterventionError("AddVector.vector must be a non-empty list of numbers")
        object.__setattr__(self, "vector", tuple(_float("AddVector", "vector", v) for v in self.vector))
        object.__setattr__(self, "scale", _float("AddVector", "scale", self.scale))


Intervention = AblateHeads | AblateAttn | AblateMLP | AblateNeurons | ScaleHead | Patch | Steer | AddVector
KINDS: dict[str, type] = {
    "ablate_heads": AblateHeads, "ablate_attn": AblateAttn, "ablate_mlp": AblateMLP, "ablate_neurons": AblateNeurons,
    "scale_head": ScaleHead, "patch": Patch, "steer": Steer, "add_vector": AddVector,
}
_KIND_OF = {cls: kind for kind, cls in KINDS.items()}


def to_dict(intervention: Intervention) -> dict:
    """A JSON-ready dict: `{"kind": ..., field: value, ...}` (tuples as lists)."""
    kind = _KIND_OF.get(type(intervention))
    if kind is None:
        raise InterventionError(f"not an intervention: {intervention!r}")
    d = {"kind": kind}
    for f in fields(intervention):
        value = getattr(intervention, f.name)
        d[f.name] = list(value) if isinstance(value, tuple) else value
    return d


def from_dict(d) -> Intervention:
    """The inverse of `to_dict`, for data from outside (a share link): exact keys, every field validated."""
    if not isinstance(d, dict) or d.get("kind") not in KINDS:
        raise InterventionError(f"an intervention must be a dict with 'kind' one of {sorted(KINDS)}, got {d!r:.80}")
    cls = KINDS[d["kind"]]
    names = [f.name for f in fields(cls)]
    keys = set(d) - {"kind"}
    if not keys <= set(names):
        raise InterventionError(f"{cls.__name__} has no field(s) {sorted(keys - set(names))}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "kind"})
    except TypeError:  # a required field is missing
        raise InterventionError(f"{cls.__name__} needs the fields {names}, got {sorted(keys)}") from None


# --- what a plan does at a hook point ------------------------------------------------------------

Edit = Callable[[torch.Tensor, int], None]
"""`edit(x, start)` changes in place an activation `x` covering absolute positions start, start + 1, ...
(positions on dim 2 for `[batch, head, pos, d_head]` activations, dim 1 for `[batch, pos, width]`)."""


def _head_axis_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("q", "k", "v", "z", "scores", "pattern")


class Plan:
    """Interventions resolved for one model: `edits[hook name]` = the edits made there, in order."""

    def __init__(self, interventions: tuple, edits: dict[str, list[Edit]]) -> None:
        self.interventions = interventions
        self.edits = edits

    def __bool__(self) -> bool:
        return bool(self.edits)

    @property
    def recordable(self) -> bool:
        """Whether a recording session's views can show these edits (see `UNRECORDABLE`)."""
        return not any(name.rsplit(".", 1)[-1] in UNRECORDABLE for name in self.edits)

    def apply(self, name: str, x: torch.Tensor, start: int) -> torch.Tensor:
        """`x` after the edits at hook point `name` (a new tensor when there are any; x itself otherwise)."""
        edits = self.edits.get(name)
        if not edits:
            return x
        x = x.clone()
        for edit in edits:
            edit(x, start)
        return x

    def hooks(self, start: int) -> list[tuple[str, Callable]]:
        """`model.hooks(...)` entries that make the edits in a forward pass whose first new position is
        `start` (the KV cache's length before the pass)."""
        return [(name, (lambda x, hook, name=name: self.apply(name, x, start))) for name in self.edits]


def _positions_slice(x: torch.Tensor, axis: int, start: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The `positions` (absolute, sorted) that fall inside x's window: (local index, index into positions)."""
    T = x.shape[axis]
    inside = (positions >= start) & (positions < start + T)
    return (positions[inside] - start), torch.nonzero(inside).flatten()


def _set_heads(heads: list[int], values: torch.Tensor | None) -> Edit:
    idx = torch.tensor(heads)

    def edit(x, start):
        if values is None:
            x[:, idx] = 0
        else:
            x[:, idx] = values[idx][None, :, None, :].to(x.dtype)  # [1, h, 1, D] over batch and positions
    return edit


def _scale_head(head: int, factor: float) -> Edit:
    def edit(x, start):
        x[:, head] *= factor
    return edit


def _set_all(value: torch.Tensor | None) -> Edit:
    def edit(x, start):
        if value is None:
            x.zero_()
        else:
            x[...] = value.to(x.dtype)
    return edit


def _set_neurons(neurons: list[int], values: torch.Tensor | None) -> Edit:
    idx = torch.tensor(neurons)

    def edit(x, start):
        x[..., idx] = 0 if values is None else values[idx].to(x.dtype)
    return edit


def _add(vector: torch.Tensor) -> Edit:
    def edit(x, start):
        x += vector.to(x.dtype)
    return edit


def _replace(source: torch.Tensor, positions: torch.Tensor, axis: int) -> Edit:
    """source: the activation of the source run, batch item 0 (`[head, T_src, D]`, `[head, T_src, S_src]` for
    scores and patterns, or `[T_src, width]`)."""
    def edit(x, start):
        local, which = _positions_slice(x, axis, start, positions)
        if local.numel() == 0:
            return
        src = source.index_select(axis - 1, positions[which]).to(x.dtype)
        if src.dim() == 3 and src.shape[-1] != x.shape[-1]:  # scores / pattern: the keys seen so far (causal)
            src = src[..., : x.shape[-1]]
        if axis == 2:
            x[:, :, local] = src[None]
        else:
            x[:, local] = src[None]
    return edit


# --- resolving against a model ---------------------------------------------------------------

_MEANS: "weakref.WeakKeyDictionary[GPT2, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def reference_means(model: GPT2, tokenizer) -> dict[str, torch.Tensor]:
    """Mean over `REFERENCE_TEXT`'s positions, read by the unmodified model, of every layer's z
    (`[head, d_head]`), attn_out and mlp_out (`[d_model]`) and mlp.post (`[d_mlp]`); cached per model."""
    cached = _MEANS.get(model)
    if cached is not None:
        return cached
    ids = encode(tokenizer, REFERENCE_TEXT)[: model.cfg.n_positions]
    names = ["z", "attn_out", "mlp_out", "mlp_post"]
    _, cache = model.run_with_cache(torch.tensor([ids], device=model.device), names=names)
    means = {}
    for name, act in cache.items():
        act = act[0].float()
        means[name] = act.mean(dim=1) if _head_axis_name(name) else act.mean(dim=0)
    _MEANS[model] = means
    return means


def _hook_name(model: GPT2, spec: str) -> str:
    """A hook point's full name, from a full name (`"blocks.3.attn.pattern"`) or a short one with a layer (`"pattern.3"`)."""
    if spec in model.hook_points:
        return spec
    short, _, layer = spec.rpartition(".")
    if short in LAYER_HOOK_TEMPLATES and layer.isdigit() and layer.isascii() and int(layer) < model.cfg.n_layer:
        return LAYER_HOOK_TEMPLATES[short].format(int(layer))
    raise InterventionError(
        f"cannot patch {spec!r}: no such hook point; use a full name such as 'blocks.0.resid_pre' or 'embed', or a "
        f"short one with a layer such as 'pattern.{model.cfg.n_layer - 1}' (layers 0..{model.cfg.n_layer - 1})"
    )


def _resid_site(layer: int) -> str:
    """Where an edit of the stream entering `layer` is made (see the module docstring)."""
    return "blocks.0.resid_pre" if layer == 0 else f"blocks.{layer - 1}.resid_post"


def _check_layer(model: GPT2, owner: str, layer: int) -> None:
    if layer >= model.cfg.n_layer:
        raise InterventionError(f"{owner}: layer {layer} does not exist; this model has layers 0..{model.cfg.n_layer - 1}")


def _source_ids(model: GPT2, tokenizer, owner: str, text: str) -> list[int]:
    ids = encode(tokenizer, text)
    if not ids:
        raise InterventionError(f"{owner}: the text {text!r} has no tokens")
    if len(ids) > model.cfg.n_positions:
        raise InterventionError(f"{owner}: the text has {len(ids)} tokens, more than the model's {model.cfg.n_positions}")
    return ids


@torch.no_grad()
def resolve(interventions: Sequence[Intervention], model: GPT2, tokenizer) -> Plan:
    """Check `interventions` against `model` and compute what they need (means, patch sources,
    steering vectors): the `Plan` that makes them. Raises `InterventionError` with what is wrong."""
    if isinstance(interventions, (str, bytes, dict)) or not isinstance(interventions, (list, tuple)):
        raise InterventionError(f"interventions must be a list of intervention values, got {type(interventions).__name__}")
    if len(interventions) > MAX_INTERVENTIONS:
        raise InterventionError(f"at most {MAX_INTERVENTIONS} interventions, got {len(interventions)}")
    cfg = model.cfg
    edits: dict[str, list[Edit]] = {}

    def add(name: str, edit: Edit) -> None:
        edits.setdefault(name, []).append(edit)

    def means() -> dict[str, torch.Tensor]:
        return reference_means(model, tokenizer)

    for iv in interventions:
        if type(iv) not in _KIND_OF:
            raise InterventionError(f"not an intervention: {iv!r:.80}")
        if not isinstance(iv, Patch):
            _check_layer(model, type(iv).__name__, iv.layer)
        if isinstance(iv, AblateHeads):
            bad = [h for h in iv.heads if h >= cfg.n_head]
            if bad:
                raise InterventionError(f"AblateHeads: head {bad[0]} does not exist; layer {iv.layer} has heads 0..{cfg.n_head - 1}")
            name = f"blocks.{iv.layer}.attn.z"
            add(name, _set_heads(list(iv.heads), None if iv.mode == "zero" else means()[name]))
        elif isinstance(iv, ScaleHead):
            if iv.head >= cfg.n_head:
                raise InterventionError(f"ScaleHead: head {iv.head} does not exist; layer {iv.layer} has heads 0..{cfg.n_head - 1}")
            add(f"blocks.{iv.layer}.attn.z", _scale_head(iv.head, iv.factor))
        elif isinstance(iv, (AblateAttn, AblateMLP)):
            name = f"blocks.{iv.layer}.{'attn_out' if isinstance(iv, AblateAttn) else 'mlp_out'}"
            add(name, _set_all(None if iv.mode == "zero" else means()[name]))
        elif isinstance(iv, AblateNeurons):
            bad = [n for n in iv.neurons if n >= cfg.d_mlp]
            if bad:
                raise InterventionError(f"AblateNeurons: neuron {bad[0]} does not exist; layer {iv.layer} has neurons 0..{cfg.d_mlp - 1}")
            name = f"blocks.{iv.layer}.mlp.post"
            add(name, _set_neurons(list(iv.neurons), None if iv.mode == "zero" else means()[name]))
        elif isinstance(iv, Patch):
            name = _hook_name(model, iv.hook)
            ids = _source_ids(model, tokenizer, "Patch", iv.source)
            if iv.positions is not None and max(iv.positions) >= len(ids):
                raise InterventionError(f"Patch: position {max(iv.positions)} is past the source text's {len(ids)} tokens")
            positions = torch.tensor(sorted(iv.positions) if iv.positions is not None else range(len(ids)))
            _, cache = model.run_with_cache(torch.tensor([ids], device=model.device), names=[name])
            site = name
            if name.endswith("resid_pre"):
                site = _resid_site(int(name.split(".")[1]))
            add(site, _replace(cache[name][0], positions.to(model.device), 2 if _head_axis_name(name) else 1))
        elif isinstance(iv, (Steer, AddVector)):
            if isinstance(iv, Steer):
                name = f"blocks.{iv.layer}.resid_pre"
                mean = []
                for text in (iv.plus, iv.minus):
                    _, cache = model.run_with_cache(torch.tensor([_source_ids(model, tokenizer, "Steer", text)], device=model.device),
                                                    names=[name])
                    mean.append(cache[name][0].mean(dim=0))
                vector = mean[0] - mean[1]
            else:
                if len(iv.vector) != cfg.n_embd:
                    raise InterventionError(f"AddVector: the vector has {len(iv.vector)} numbers; this model's residual stream has {cfg.n_embd}")
                vector = torch.tensor(iv.vector, dtype=model.wte.weight.dtype, device=model.device)
            add(_resid_site(iv.layer), _add(vector * iv.scale))
    return Plan(tuple(interventions), edits)


def describe(intervention: Intervention, mode: bool = True) -> str:
    """A short label for a page or a report: "head 1.0, head 1.3 off", "MLP 3 → mean", ... (`mode=False`: without
    "off" / "→ mean", for a list that says it once)."""
    iv = intervention
    how = (" off" if getattr(iv, "mode", "zero") == "zero" else " → mean") if mode else ""
    if isinstance(iv, AblateHeads):
        return ", ".join(f"head {iv.layer}.{h}" for h in iv.heads) + how
    if isinstance(iv, AblateAttn):
        return f"attention {iv.layer}{how}"
    if isinstance(iv, AblateMLP):
        return f"MLP {iv.layer}{how}"
    if isinstance(iv, AblateNeurons):
        return f"MLP {iv.layer} neuron{'s' if len(iv.neurons) > 1 else ''} {', '.join(map(str, iv.neurons))}{how}"
    if isinstance(iv, ScaleHead):
        return f"head {iv.layer}.{iv.head} × {iv.factor:g}"
    if isinstance(iv, Patch):
        source = iv.source if len(iv.source) <= 30 else iv.source[:29] + "…"
        parts = iv.hook.split(".")
        where = f"the residual stream entering layer {parts[1]}" if parts[-1] == "resid_pre" and len(parts) == 3 else iv.hook
        return f"{where} patched from {source!r}"
    if isinstance(iv, Steer):
        return f"layer {iv.layer} steered {iv.scale:g} × ({iv.plus[:16]!r} − {iv.minus[:16]!r})"
    return f"layer {iv.layer} + {iv.scale:g} × vector"
