"""The page's "Why" view: why the selected token, from `attribution.py` and the sampler's stages. HTML only
(small, legible on a phone, and clickable: a head's cell selects it like the all-heads overview)."""

from __future__ import annotations

import html

import numpy as np
import torch

from . import plots
from .attribution import Attribution, Neurons, attribution, neuron_contributions, neuron_tokens, sampler_anatomy
from .generation import GenerationSession
from .tokenizer import token_strings


def _shade(value: float, scale: float) -> str:
    """Red for a push toward the chosen token, blue toward the comparison, white for nothing."""
    a = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    colour = (214, 39, 40) if value > 0 else (31, 119, 180)
    return f"rgba({colour[0]}, {colour[1]}, {colour[2]}, {0.08 + 0.72 * a:.2f})"


def _tok(tokenizer, token_id: int) -> str:
    return html.escape(plots.show(token_strings(tokenizer, [token_id])[0]))


def attribution_html(a: Attribution, tokenizer, selected: tuple[int, int]) -> str:
    """Layers x heads (and each layer's MLP) coloured by their part of the logit difference; every cell has
    its number; the biggest parts named; the sum shown equal to the logit difference."""
    n_layer, n_head = a.heads.shape
    scale = max(float(np.abs(a.heads).max()), float(np.abs(a.mlp).max()), 1e-9)
    target, other = _tok(tokenizer, a.target), _tok(tokenizer, a.baseline)
    cells = ['<div class="ov-corner">layer \\ head</div>'] + [f'<div class="ov-col">{h}</div>' for h in range(n_head)]
    cells.append('<div class="ov-col why-mlp">MLP</div>')
    for layer in range(n_layer):
        cells.append(f'<div class="ov-row">{layer}</div>')
        for h in range(n_head):
            v = float(a.heads[layer, h])
            sel = " ov-sel" if (layer, h) == tuple(selected) else ""
            cells.append(f'<button class="why-cell{sel}" data-layer="{layer}" data-head="{h}" style="background: {_shade(v, scale)}" '
                         f'title="head {layer}.{h}: {v:+.3f}">{v:+.2f}</button>')
        v = float(a.mlp[layer])
        cells.append(f'<button class="why-cell why-mlp" data-layer="{layer}" data-mlp="1" style="background: {_shade(v, scale)}" '
                     f'title="MLP {layer}: {v:+.3f}">{v:+.2f}</button>')
    top = ", ".join(f"{html.escape(name)} <b>{value:+.2f}</b>" for name, value in a.top(4))
    rest = (f" + rest {a.rest:+.3f}" if abs(a.rest) >= 5e-4 else "")
    return (
        f'<div class="why"><div class="ov-title">Why {target} and not {other}, after reading token {a.position}</div>'
        f'<div class="ov-note">{_scored(a, target, other)} That difference is '
        f'exactly the sum of what each part of the model wrote into the residual stream, read through the final layer norm: '
        f'red cells push toward {target}, blue toward {other}. Biggest parts: {top}.</div>'
        f'<div class="ov-grid why-grid" style="grid-template-columns: 3.2em repeat({n_head + 1}, minmax(0, 1fr))">'
        + "".join(cells) + "</div>"
        f'<div class="ov-note">Sum: token embedding {a.embed:+.2f} + position embedding {a.pos_embed:+.2f} + heads '
        f'{a.heads.sum():+.2f} + MLPs {a.mlp.sum():+.2f} + biases {a.attn_bias.sum() + a.ln_bias:+.2f}{rest} = '
        f'<b>{a.logit_diff:+.2f}</b>. A big part is a claim to test: switch that head off in the Experiment tab. '
        f'Click a head to open it in the Attention tab, or an MLP to see its neurons below.</div></div>')


def _scored(a: Attribution, target: str, other: str) -> str:
    if a.logit_diff >= 0:
        return f"The model scored {target} <b>{a.logit_diff:+.2f}</b> above {other} (logits)."
    return (f"The model scored {target} <b>{-a.logit_diff:.2f} below</b> {other} (logits), and {target} came all the same: "
            f"a sampled token need not be the likeliest.")


def _tokens(tokenizer, ids: list[int]) -> str:
    return " ".join(f'<span class="why-tok">{_tok(tokenizer, t)}</span>' for t in ids)


def neurons_html(n: Neurons, session: GenerationSession, target: int, baseline: int, count: int = 8) -> str:
    """The neurons of one MLP layer with the largest part in the logit difference, and what each promotes."""
    tok = session.tokenizer
    rows = []
    top = [int(i) for i in n.top_contributors(count)]
    for i, (up, down) in zip(top, neuron_tokens(session, n.layer, top, n=3)):
        rows.append(f'<tr><td>{int(i)}</td><td>{n.activation[i]:+.2f}</td>'
                    f'<td style="background: {_shade(float(n.contribution[i]), float(np.abs(n.contribution).max()) or 1)}">'
                    f'{n.contribution[i]:+.3f}</td><td>{_tokens(tok, up)}</td><td>{_tokens(tok, down)}</td></tr>')
    active = ", ".join(f"{int(i)} ({n.activation[i]:+.2f})" for i in n.most_active(5))
    return (f'<div class="why"><div class="ov-title">MLP {n.layer}: the neurons behind its part '
            f'({n.contribution.sum() + n.bias:+.2f})</div>'
            f'<table class="why-table"><tr><th>neuron</th><th>activation</th><th>part</th><th>raises</th><th>lowers</th></tr>'
            + "".join(rows) + "</table>"
            f'<div class="ov-note">A neuron\'s part = its activation × how its output direction moves {_tok(tok, target)} above '
            f'{_tok(tok, baseline)}; the layer\'s {n.contribution.size} neurons and its bias ({n.bias:+.2f}) add up to the MLP\'s '
            f'part. Raises / lowers: the tokens its direction pushes up and down most. Most active here: {active}. To switch '
            f'neurons off, write them in the Experiment tab (“{n.layer}: {int(n.top_contributors(1)[0])}”).</div></div>')


def sampler_html(session: GenerationSession, position: int, settings) -> str:
    """How the token at `position` was drawn: each stage's top candidates and the mass it removed, the uniform
    number u and the slice it fell in; and which token the same u picks under the page's current `settings`."""
    tok = session.tokenizer
    if position < len(session.prompt_ids):
        return ('<div class="why"><div class="ov-note">This token is part of your prompt: nothing was drawn. Select a '
                'generated token to see how the sampler chose it.</div></div>')
    d = sampler_anatomy(session, position)
    st, cfg, token = d.stages, d.config, d.token
    final = st[-1].probs
    ids = torch.topk(st[0].probs, 6).indices.tolist()
    ids += [i for i in torch.topk(final, 6).indices.tolist() if i not in ids and float(final[i]) > 0]
    if token not in ids:
        ids.append(token)
    ids.sort(key=lambda i: -float(final[i]))
    head = "".join(f'<th>{html.escape(s.name)}' + (f'<br><small>−{plots.pct(s.removed)}</small>' if s.removed > 0 else "")
                   + ("" if s.active else "<br><small>(off)</small>") + "</th>" for s in st)
    rows = []
    for i in ids:
        mark = "▶ " if i == token else ""
        cells = "".join(f"<td>{plots.pct(float(s.probs[i]))}</td>" for s in st)
        rows.append(f'<tr class="{"why-chosen" if mark else ""}"><td>{mark}{_tok(tok, i)}</td>{cells}</tr>')
    if d.method == "sampled":
        low, high = d.slice
        drawn = (f"The draw: u = <b>{d.u:.4f}</b> (from seed {cfg.seed} and position {position}). Lined up in "
                 f"vocabulary order, the final probabilities cover [0, 1); u fell in {_tok(tok, token)}'s slice "
                 f"[{low:.4f}, {high:.4f}), so it was chosen.")
    elif d.method == "greedy":
        drawn = "Temperature 0: the likeliest token is taken, nothing is drawn."
    else:
        drawn = "You chose this token yourself: nothing was drawn."
    what_if = ""
    if settings is not None and d.u is not None:
        other = d.what_if(settings)
        same = "the same token" if other == token else f"<b>{_tok(tok, other)}</b> instead"
        what_if = (f" <b>What if</b>, with the settings now on the page ({_settings(settings)}): the same u would have "
                   f"drawn {same}. Move the sampling controls to try others.")
    return (f'<div class="why"><div class="ov-title">How token {position} ({_tok(tok, token)}) was drawn</div>'
            f'<table class="why-table"><tr><th>token</th>{head}</tr>' + "".join(rows) + "</table>"
            f'<div class="ov-note">Each column is one stage of the sampler, left to right ({_settings(cfg)}); '
            f'a filter\'s header says how much probability it removed before the rest was renormalised. {drawn}{what_if}</div></div>')


def _settings(cfg) -> str:
    if cfg.greedy:
        return "temperature 0"
    parts = [f"temperature {cfg.temperature:g}", f"top-k {cfg.top_k or 'off'}", f"top-p {cfg.top_p:g}"]
    if cfg.repetition_penalty != 1:
        parts.append(f"penalty {cfg.repetition_penalty:g}")
    return ", ".join(parts)


def why_views(session: GenerationSession, position: int, layer: int, head: int, versus: int | None, settings) -> dict:
    """The Why tab for the selected token: attribution (of the token at `position` against `versus`, or the
    runner-up), the neurons of the selected layer's MLP, and the sampler's anatomy."""
    tok = session.tokenizer
    if position == 0:
        note = '<div class="why"><div class="ov-note">Token 0 is the first token: nothing came before it to explain.</div></div>'
        return {"why_dla": note, "why_neurons": "", "why_sampler": ""}
    target = session.ids[position]
    baseline = versus if versus is not None and versus != target else None
    a = attribution(session, position - 1, target, baseline)
    n = neuron_contributions(session, position - 1, layer, target, a.baseline)
    return {"why_dla": attribution_html(a, tok, (layer, head)), "why_neurons": neurons_html(n, session, target, a.baseline),
            "why_sampler": sampler_html(session, position, settings)}
