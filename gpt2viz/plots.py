"""Pure functions from numpy arrays to plotly figures. Nothing here knows about torch or Gradio.

Figures carry float32 values rounded for display and crop long texts to a window, so
that what goes to the browser stays small.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

FONT = dict(family="system-ui, sans-serif", size=14)
BLUE, ORANGE, GREY = "#3b6fd8", "#e8762d", "#9aa3ad"


def show(token: str) -> str:
    """A token as a readable label: visible spaces and newlines."""
    return token.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥") or "∅"


def unique(names: list[str]) -> list[str]:
    """Make repeated category labels distinct with invisible suffixes (plotly merges equal ones)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        out.append(n + "\u200b" * seen.get(n, 0))
        seen[n] = seen.get(n, 0) + 1
    return out


def labels(tokens: list[str], start: int = 0) -> list[str]:
    """Unique axis labels `"12 ·the"` (plotly merges equal category labels)."""
    return [f"{start + i} {show(t)}" for i, t in enumerate(tokens)]


def f32(values, decimals: int = 3) -> np.ndarray:
    """Values rounded for display and sent as float32 (half the bytes of float64)."""
    return np.round(np.asarray(values, dtype=np.float32), decimals)


def _layout(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    # "none": no template, whose defaults would add ~10 KB to every figure sent to the browser
    fig.update_layout(title=dict(text=title, x=0.01), font=FONT, height=height, template="none",
                      margin=dict(l=10, r=10, t=60, b=10), plot_bgcolor="white", paper_bgcolor="white")
    fig.update_xaxes(automargin=True, gridcolor="#e5e8ec")
    fig.update_yaxes(automargin=True, gridcolor="#e5e8ec")
    return fig


def empty_figure(message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, font=dict(size=16, color=GREY), x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, "", height=240)


def next_token_figure(tokens: list[str], probs: np.ndarray, probs_final: np.ndarray, chosen: int | None, title: str) -> go.Figure:
    """Bars of the top candidates: raw probability beside the final one (after the controls).

    tokens `[N]`, probs `[N]`, probs_final `[N]`; `chosen` is the index of the chosen token or None.
    """
    names = unique([("▶ " if i == chosen else "") + show(t) for i, t in enumerate(tokens)])
    fig = go.Figure()
    fig.add_bar(y=names, x=f32(probs, 4), orientation="h", name="model (raw)", marker_color=GREY,
                text=[f"{p:.1%}" for p in probs], textposition="outside")
    fig.add_bar(y=names, x=f32(probs_final, 4), orientation="h", name="after your settings", marker_color=BLUE,
                text=[f"{p:.1%}" for p in probs_final], textposition="outside")
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(title="probability", range=[0, min(1.0, max(float(np.max(probs)), float(np.max(probs_final))) * 1.25 + 0.02)])
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.15))
    return _layout(fig, title, height=max(320, 34 * len(tokens) + 120))


def attention_heatmap(pattern: np.ndarray, tokens: list[str], start: int, title: str, selected: int | None = None) -> go.Figure:
    """One head's attention `[query, key]` over the window of tokens starting at `start`."""
    axis = labels(tokens, start)
    z = np.where(np.tril(np.ones_like(pattern, dtype=bool)), f32(pattern, 3), np.nan)
    fig = go.Figure(go.Heatmap(z=z, x=axis, y=axis, colorscale="Blues", zmin=0, zmax=1,
                               hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>",
                               colorbar=dict(title="attention")))
    fig.update_yaxes(autorange="reversed", title="query (reading token)", type="category")
    fig.update_xaxes(title="key (token attended to)", type="category", tickangle=-60)
    if selected is not None and start <= selected < start + len(tokens):
        fig.add_hline(y=axis[selected - start], line=dict(color=ORANGE, width=2))
    return _layout(fig, title, height=560)


def heads_grid(patterns: np.ndarray, tokens: list[str], start: int, title: str) -> go.Figure:
    """All heads of one layer `[head, query, key]` as small heatmaps."""
    n_head = patterns.shape[0]
    cols = int(np.ceil(np.sqrt(n_head)))
    rows = int(np.ceil(n_head / cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"head {h}" for h in range(n_head)],
                        horizontal_spacing=0.02, vertical_spacing=0.06)
    axis = labels(tokens, start)
    mask = np.tril(np.ones(patterns.shape[1:], dtype=bool))
    for h in range(n_head):
        z = np.where(mask, f32(patterns[h], 2), np.nan)
        fig.add_trace(go.Heatmap(z=z, x=axis, y=axis, colorscale="Blues", zmin=0, zmax=1, showscale=False,
                                 hovertemplate=f"head {h}<br>query %{{y}}<br>key %{{x}}<br>%{{z:.2f}}<extra></extra>"),
                      row=h // cols + 1, col=h % cols + 1)
    fig.update_xaxes(showticklabels=False, type="category")
    fig.update_yaxes(showticklabels=False, autorange="reversed", type="category")
    return _layout(fig, title, height=max(420, 190 * rows + 60))


def attention_row_figure(row: np.ndarray, tokens: list[str], start: int, title: str) -> go.Figure:
    """The selected token's attention over earlier tokens: per head `[head, key]` and the mean over heads."""
    axis = labels(tokens, start)
    fig = make_subplots(rows=2, cols=1, row_heights=[0.35, 0.65], shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=["average over heads", "each head"])
    fig.add_bar(x=axis, y=f32(row.mean(0), 3), marker_color=BLUE, name="average",
                hovertemplate="key %{x}<br>average attention %{y:.3f}<extra></extra>", row=1, col=1)
    fig.add_trace(go.Heatmap(z=f32(row, 3), x=axis, y=[f"head {h}" for h in range(row.shape[0])],
                             colorscale="Blues", zmin=0, zmax=1, colorbar=dict(title="attention", y=0.33, len=0.65),
                             hovertemplate="%{y}<br>key %{x}<br>%{z:.3f}<extra></extra>"), row=2, col=1)
    fig.update_xaxes(type="category", tickangle=-60, row=2, col=1)
    fig.update_yaxes(autorange="reversed", row=2, col=1)
    fig.update_layout(showlegend=False)
    return _layout(fig, title, height=520)


def logit_lens_figure(top_tokens: list[list[str]], top_probs: np.ndarray, tokens: list[str], start: int, title: str,
                      next_tokens: list[str] | None = None) -> go.Figure:
    """Positions x layers: each cell the top token read from that layer's residual, coloured by its probability.

    top_tokens `[layer + 1][W]` strings, top_probs `[layer + 1, W]`; layer row 0 is the embeddings.
    Drawn with positions down the page and layers across, so that the cell labels stay readable.
    """
    n_layers = len(top_tokens)
    x = ["embeddings"] + [f"block {i}" for i in range(n_layers - 1)]
    y = labels(tokens, start)
    text = [[show(top_tokens[layer][w]) for layer in range(n_layers)] for w in range(len(tokens))]
    custom = [[show(next_tokens[w]) if next_tokens else ""] * n_layers for w in range(len(tokens))]
    fig = go.Figure(go.Heatmap(z=f32(np.asarray(top_probs).T, 3), x=x, y=y, text=text, texttemplate="%{text}",
                               textfont=dict(size=13), colorscale="YlGnBu", zmin=0, zmax=1, customdata=custom,
                               colorbar=dict(title="probability"),
                               hovertemplate="reading %{y}<br>%{x}: top guess %{text} (%{z:.1%})"
                                             "<br>actual next token: %{customdata}<extra></extra>"))
    fig.update_xaxes(type="category", side="top", title="layer (read through the final layer norm and unembedding)")
    fig.update_yaxes(type="category", autorange="reversed", title="position (the token being read)")
    return _layout(fig, title, height=max(380, 30 * len(tokens) + 160))


def embedding_figure(embed: np.ndarray, pos_embed: np.ndarray, title: str) -> go.Figure:
    """The token embedding and position embedding of one token, dimension by dimension `[d_model]`."""
    dims = np.arange(embed.shape[0])
    fig = go.Figure()
    fig.add_scatter(x=dims, y=f32(embed, 3), name="token embedding", mode="lines", line=dict(color=BLUE))
    fig.add_scatter(x=dims, y=f32(pos_embed, 3), name="position embedding", mode="lines", line=dict(color=ORANGE))
    fig.update_xaxes(title="dimension")
    fig.update_yaxes(title="value")
    fig.update_layout(legend=dict(orientation="h", y=-0.25))
    return _layout(fig, title, height=340)


def resid_norm_figure(norms: np.ndarray, title: str) -> go.Figure:
    """Length of the residual stream `[layer + 1]` after the embeddings and each block."""
    x = ["embeddings"] + [f"block {i}" for i in range(len(norms) - 1)]
    fig = go.Figure(go.Scatter(x=x, y=f32(norms, 3), mode="lines+markers", line=dict(color=BLUE),
                               hovertemplate="%{x}<br>norm %{y:.2f}<extra></extra>"))
    fig.update_xaxes(type="category")
    fig.update_yaxes(title="length (L2 norm)", rangemode="tozero")
    return _layout(fig, title, height=320)


def pca_2d(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project `[n, d]` points onto their first two principal components: `([n, 2], explained variance ratio [2])`."""
    centred = points.astype(np.float64) - points.mean(0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T
    var = s**2
    ratio = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
        ratio = np.pad(ratio, (0, 2 - ratio.shape[0]))
    return coords, ratio


def trajectory_figure(resid: np.ndarray, nearest: list[str], title: str) -> go.Figure:
    """2-D PCA path of one token's residual stream `[layer + 1, d_model]`, each point labelled."""
    coords, ratio = pca_2d(resid)
    names = ["embeddings"] + [f"block {i}" for i in range(len(resid) - 1)]
    fig = go.Figure(go.Scatter(
        x=f32(coords[:, 0]), y=f32(coords[:, 1]), mode="lines+markers+text",
        text=[f"{i}: {show(t)}" for i, t in enumerate(nearest)], textposition="top center",
        marker=dict(size=10, color=np.arange(len(coords)), colorscale="Viridis", showscale=False),
        line=dict(color=GREY), customdata=names,
        hovertemplate="%{customdata}<br>nearest token %{text}<extra></extra>"))
    fig.update_xaxes(title=f"PC 1 ({ratio[0]:.0%} of the variance)", zeroline=False)
    fig.update_yaxes(title=f"PC 2 ({ratio[1]:.0%})", zeroline=False, scaleanchor="x", scaleratio=1)
    return _layout(fig, title, height=460)
