"""The page's Experiment view: what to switch off (as the labels a page lists), and what a coupled
comparison (`compare.coupled_report`) shows. Plain values in, HTML and figures out."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

import numpy as np
import torch

from . import plots
from .compare import Comparison
from .generation import Step
from .interventions import MAX_TEXT_CHARS, AblateAttn, AblateHeads, AblateMLP, AblateNeurons, Intervention, Patch, describe
from .model import GPT2Config
from .tokenizer import token_strings

MAX_TARGETS = 48
TARGET = re.compile(r"(head) ([0-9]{1,2})\.([0-9]{1,2})|(attention|MLP) ([0-9]{1,2})")
NEURONS = re.compile(r"\s*([0-9]{1,2})\s*:\s*([0-9]{1,5}(?:\s*,\s*[0-9]{1,5})*)\s*")  # "5: 12, 700"
MAX_NEURONS = 64


class TargetError(ValueError):
    """A list of things to switch off that the page cannot use."""


def target_choices(cfg: GPT2Config) -> list[str]:
    """Every head, attention layer and MLP layer of a model, as the page lists them: `head 1.0`, `attention 1`, `MLP 1`."""
    return ([f"head {layer}.{head}" for layer in range(cfg.n_layer) for head in range(cfg.n_head)]
            + [f"attention {layer}" for layer in range(cfg.n_layer)] + [f"MLP {layer}" for layer in range(cfg.n_layer)])


def head_label(layer: int, head: int) -> str:
    return f"head {layer}.{head}"


def parse_neurons(text, cfg: GPT2Config) -> tuple[int, tuple[int, ...]] | None:
    """`"5: 12, 700"` -> (layer 5, neurons (12, 700)); empty -> None."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    m = NEURONS.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise TargetError("Write neurons as layer: neuron, neuron, ... (for example 5: 12, 700).")
    layer, neurons = int(m.group(1)), sorted({int(n) for n in m.group(2).split(",")})
    if layer >= cfg.n_layer:
        raise TargetError(f"This model has no MLP {layer} (it has {cfg.n_layer} layers).")
    if neurons[-1] >= cfg.d_mlp:
        raise TargetError(f"MLP {layer} has neurons 0 to {cfg.d_mlp - 1}, not {neurons[-1]}.")
    if len(neurons) > MAX_NEURONS:
        raise TargetError(f"Choose at most {MAX_NEURONS} neurons.")
    return layer, tuple(neurons)


def parse_targets(labels, mode: str, cfg: GPT2Config, neurons: str = "", patch_text: str = "",
                  patch_layer=None) -> list[Intervention]:
    """Labels from `target_choices`, a mode ("zero" or "mean"), MLP neurons (`parse_neurons`) and a patch
    source (the residual stream entering `patch_layer` taken from the run on `patch_text`) -> interventions."""
    if mode not in ("zero", "mean"):
        raise TargetError("Choose how to switch them off: set to zero, or to their average.")
    if isinstance(labels, str):
        labels = [labels]
    labels = list(labels) if isinstance(labels, (list, tuple)) else labels
    extra: list[Intervention] = []
    chosen = parse_neurons(neurons, cfg)
    if chosen is not None:
        extra.append(AblateNeurons(layer=chosen[0], neurons=chosen[1], mode=mode))
    if isinstance(patch_text, str) and patch_text.strip():
        if len(patch_text) > MAX_TEXT_CHARS:
            raise TargetError(f"The patch source is longer than {MAX_TEXT_CHARS} characters.")
        layer = patch_layer if isinstance(patch_layer, int) and not isinstance(patch_layer, bool) else None
        if layer is None or not 0 <= layer < cfg.n_layer:
            raise TargetError(f"Choose the layer whose incoming residual stream to patch (0 to {cfg.n_layer - 1}).")
        extra.append(Patch(hook=f"blocks.{layer}.resid_pre", source=patch_text))
    if not isinstance(labels, list) or (not labels and not extra):
        raise TargetError("Choose what to switch off first: a head (select one in the views and press “Add”), an attention "
                          "layer or an MLP, neurons, or a text to patch from.")
    if len(labels) > MAX_TARGETS:
        raise TargetError(f"Choose at most {MAX_TARGETS} things to switch off.")
    heads: dict[int, list[int]] = {}
    out: list[Intervention] = []
    for label in labels:
        m = TARGET.fullmatch(label) if isinstance(label, str) else None
        if m is None:
            raise TargetError(f"{str(label)[:40]!r} is not something this page can switch off.")
        if m.group(1):
            layer, head = int(m.group(2)), int(m.group(3))
            if layer >= cfg.n_layer or head >= cfg.n_head:
                raise TargetError(f"This model has no {label} (it has {cfg.n_layer} layers × {cfg.n_head} heads).")
            if head not in heads.setdefault(layer, []):
                heads[layer].append(head)
        else:
            layer = int(m.group(5))
            if layer >= cfg.n_layer:
                raise TargetError(f"This model has no {label} (it has {cfg.n_layer} layers).")
            out.append((AblateAttn if m.group(4) == "attention" else AblateMLP)(layer=layer, mode=mode))
    heads_out = [AblateHeads(layer=layer, heads=tuple(sorted(hs)), mode=mode) for layer, hs in sorted(heads.items())]
    return heads_out + out + extra


@dataclass
class Experiment:
    """One run of the Experiment view, kept with the user's session."""

    labels: list[str]
    mode: str
    interventions: list[Intervention]
    report: Comparison
    original_steps: list[Step]
    intervened_steps: list[Step]

    @property
    def what(self) -> str:
        off = [describe(iv, mode=False) for iv in self.interventions if not isinstance(iv, Patch)]
        patched = [describe(iv, mode=False) for iv in self.interventions if isinstance(iv, Patch)]
        text = ", ".join(off) + ((" set to zero" if self.mode == "zero" else " set to their average") if off else "")
        return "; ".join([text] * bool(off) + patched)

    @property
    def nbytes(self) -> int:
        r = self.report
        return sum(tf.normed.numel() * tf.normed.element_size() for tf in (r.original, r.intervened) if tf is not None)


def summary(exp: Experiment) -> str:
    r = exp.report
    n = len(exp.original_steps)
    if r.first_divergence is None:
        where = f"**Both runs wrote the same {n} tokens**: switching these off did not change a single choice."
    else:
        k = r.first_divergence
        where = (f"**The texts first differ at token {r.prompt_length + k}** (generated token {k + 1} of {n}): before it, "
                 f"both runs chose the same tokens.")
    loss = ""
    if np.isfinite(r.prompt_loss_original):
        loss = (f" Loss on your prompt (how surprised the model is by its tokens, nats per token): "
                f"{r.prompt_loss_original:.2f} → **{r.prompt_loss_intervened:.2f}** ({r.loss_change:+.2f}).")
    changed = "Changed" if any(isinstance(iv, Patch) for iv in exp.interventions) else "Switched off"
    return (f"{changed}: {exp.what}. Both runs draw every token with the same random number, so any difference "
            f"is caused by what you switched off. {where}{loss}")


def _strip(tokenizer, ids: list[int], prompt_length: int, divergence: int | None, label: str, marks: bool,
           keep_prompt: int = 8) -> str:
    start = max(0, prompt_length - keep_prompt)
    spans = ['<span class="exp-label">' + html.escape(label) + "</span>"]
    if start:
        spans.append('<span class="exp-more">…</span>')
    for i, text in enumerate(token_strings(tokenizer, ids[start:]), start):
        cls = ["tok"]
        if i < prompt_length:
            cls.append("first")
        elif marks and divergence is not None:
            step = i - prompt_length
            cls.append("div-first" if step == divergence else "div" if step > divergence else "")
        spans.append(f'<span class="{" ".join(c for c in cls if c)}" title="token {i}">{html.escape(plots.show(text))}</span>')
    return '<div class="strip exp-strip">' + "".join(spans) + "</div>"


def _divergence_strip(exp: Experiment) -> str:
    r = exp.report
    cells = ['<span class="exp-label">Difference per step</span>']
    for k, (tv, kl) in enumerate(zip(r.tv, r.kl)):
        alpha = int(round(200 * float(tv))) + 20
        kl_text = "∞" if not np.isfinite(kl) else f"{kl:.2f}"
        cells.append(f'<span class="exp-cell" style="background: #e8762d{alpha:02x}" title="generated token {k + 1}: '
                     f'total variation {tv:.2f}, KL {kl_text} nats">{tv:.0%}</span>')
    return '<div class="exp-div">' + "".join(cells) + "</div>"


def strips_html(exp: Experiment, tokenizer) -> str:
    """Original and intervened texts (the first difference outlined, what follows it shaded) and, per generated
    step, how far apart the two distributions were (total variation, on the original text)."""
    r = exp.report
    note = ('<div class="exp-note">Difference per step: how much of the probability the two models put on different '
            'tokens at that step, both reading the original text (total variation: 0% the same distribution, 100% nothing in common).</div>')
    return ('<div class="exp">' + _strip(tokenizer, r.original_ids, r.prompt_length, r.first_divergence, "The model as it is", False)
            + _strip(tokenizer, r.intervened_ids, r.prompt_length, r.first_divergence, "With " + exp.what, True)
            + _divergence_strip(exp) + note + "</div>")


def surprisal_view(exp: Experiment):
    r = exp.report
    return (plots.surprisal_figure, -r.logprob_original, -r.logprob_intervened, r.prompt_length,
            None if r.first_divergence is None else r.prompt_length + r.first_divergence,
            "Surprise at each token",
            "the original text, read by both · grey: the model · orange: with your interventions · "
            "dotted line: where generation began · ✕: first difference")


def bars_view(exp: Experiment, position: int, tokenizer, top_n: int = 10):
    """Both models' next-token probabilities for the token at `position` of the original text (raw, before the
    sampling settings), or None where there is none (position 0, or past the original text)."""
    r = exp.report
    if not 1 <= position < len(r.original_ids) or r.original is None:
        return None
    with torch.no_grad():
        p_o = torch.softmax(r.original.logits(position - 1), -1)
        p_i = torch.softmax(r.intervened.logits(position - 1), -1)
    actual = r.original_ids[position]
    top = torch.topk(p_o, top_n).indices.tolist()
    top += [t for t in torch.topk(p_i, 3).indices.tolist() if t not in top]
    if actual not in top:
        top.append(actual)
    texts = token_strings(tokenizer, top)
    token = plots.show(token_strings(tokenizer, [actual])[0])
    a, b = float(p_o[actual]), float(p_i[actual])
    return (plots.compare_bars_figure, texts, p_o[top].numpy(), p_i[top].numpy(), top.index(actual),
            f"Token {position} ({token}): {plots.pct(a)} → {plots.pct(b)}",
            f"after reading the original text to token {position - 1} · grey: the model · orange: with your "
            f"interventions · raw model probabilities (before your settings) · ▶ the token that came")
