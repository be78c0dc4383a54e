"""Pure functions from numpy arrays to plotly figures. Nothing here knows about torch or Gradio.

Figures carry float32 values rounded for display and show a window of at most a few dozen
tokens, every one of them labelled, so that what goes to the browser stays small and readable.
Colour meanings are stated in each figure's subtitle rather than in a legend (legends collide
with axis titles on narrow screens). Tick labels are horizontal or vertical, never slanted.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

FONT = dict(family="system-ui, sans-serif", size=14)
BLUE, ORANGE, GREY, GREEN = "#3b6fd8", "#e8762d", "#9aa3ad", "#2e9e5b"
TITLE_SPACE = 92  # top margin for a title and a one-line subtitle


def show(token: str) -> str:
    """A token as a readable label, the same in every figure and in the token strip:
    spaces as `·`, newlines as `↵`, tabs as `⇥`, the empty string as `∅`."""
    return token.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍") or "∅"


def short(token: str, width: int) -> str:
    """`show(token)`, cut to `width` characters with an ellipsis (cells of a grid have little room)."""
    s = show(token)
    return s if len(s) <= width else s[: width - 1] + "…"


def pct(p: float) -> str:
    """A probability as a percentage that never rounds a non-zero value to 0."""
    if p <= 0:
        return "0%"
    if p < 0.001:
        return "<0.1%"
    return f"{p:.1%}" if p < 0.995 else f"{p:.0%}"


def unique(names: list[str]) -> list[str]:
    """Make repeated category labels distinct with invisible suffixes (plotly merges equal ones)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        out.append(n + "\u200b" * seen.get(n, 0))
        seen[n] = seen.get(n, 0) + 1
    return out


def labels(tokens: list[str], start: int = 0, width: int = 10) -> list[str]:
    """Unique axis labels `"12 ·the"` for the tokens at start, start + 1, ..."""
    return [f"{start + i} {short(t, width)}" for i, t in enumerate(tokens)]


def f32(values, decimals: int = 3) -> np.ndarray:
    """Values rounded for display and sent as float32 (half the bytes of float64)."""
    return np.round(np.asarray(values, dtype=np.float32), decimals)


SUBTITLE_CHARS = 46  # a subtitle line that fits the narrowest figure (a phone, or the controls column)


def wrap(text: str, width: int = SUBTITLE_CHARS) -> list[str]:
    """Split a subtitle made of ` · `-separated parts into lines of at most `width` characters: parts are
    joined while they fit, and a part longer than a line is broken between words."""
    lines: list[str] = []
    for part in text.split(" · ") if text else []:
        if lines and len(lines[-1]) + 3 + len(part) <= width:
            lines[-1] += " · " + part
            continue
        line = ""
        for word in part.split(" "):
            if line and len(line) + 1 + len(word) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
    return lines


def _merge(into: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


class Spec:
    """A plotly figure as plain data, built with the few calls the figures here make; `figure()` validates it
    once. (plotly's own add_* and update_* walk and validate the whole figure at every call: 50-150 ms a
    figure on this project's CPUs, against ~5 ms to build the same figure from its dict.)"""

    def __init__(self) -> None:
        self.data: list[dict] = []
        self.layout: dict = {}

    def add(self, kind: str, **trace) -> "Spec":
        self.data.append({"type": kind, **trace})
        return self

    def update_layout(self, **layout) -> "Spec":
        _merge(self.layout, layout)
        return self

    def _axes(self, letter: str, which: str | None, props: dict) -> "Spec":
        names = [which] if which else ([k for k in self.layout if k.rstrip("0123456789") == letter + "axis"] or [letter + "axis"])
        for name in names:
            _merge(self.layout.setdefault(name, {}), props)
        return self

    def update_xaxes(self, which: str | None = None, **props) -> "Spec":
        """Every x axis (or only `which`, e.g. "xaxis2")."""
        return self._axes("x", which, props)

    def update_yaxes(self, which: str | None = None, **props) -> "Spec":
        return self._axes("y", which, props)

    def add_shape(self, **shape) -> "Spec":
        self.layout.setdefault("shapes", []).append(shape)
        return self

    def add_annotation(self, **note) -> "Spec":
        self.layout.setdefault("annotations", []).append(note)
        return self

    def figure(self) -> go.Figure:
        return go.Figure({"data": self.data, "layout": self.layout})


def _layout(fig: Spec, title: str, subtitle: str = "", height: int = 420, top: int | None = None) -> go.Figure:
    # "none": no template, whose defaults would add ~10 KB to every figure sent to the browser
    lines = wrap(subtitle)
    extra = 18 * max(len(lines) - 1, 0)
    fig.update_layout(
        title=dict(text=title, subtitle=dict(text="<br>".join(lines), font=dict(size=13, color="#4a5561")),
                   x=0.01, xanchor="left", y=0.985, yanchor="top", yref="container", font=dict(size=16)),
        font=FONT, height=height + extra, template="none", showlegend=False,
        margin=dict(t=(top if top is not None else TITLE_SPACE) + extra, **_margins(fig)),
        plot_bgcolor="white", paper_bgcolor="white")
    fig.update_xaxes(automargin=False, gridcolor="#e5e8ec")
    fig.update_yaxes(automargin=False, gridcolor="#e5e8ec")
    return fig.figure()


CHAR = 0.58  # a label character's width in system-ui, per pixel of font size (a little more than the average)


def _tick_chars(fig: Spec, axis: str) -> int:
    """The longest tick label of an axis, in characters: its ticktext, or the category values of the traces
    drawn on it, or (a numeric axis) a short number such as "0.25" or "100%"."""
    props = fig.layout.get(axis, {})
    if "ticktext" in props:
        return max((len(str(t)) for t in props["ticktext"]), default=1)
    letter, suffix = axis[0], axis[5:]
    ref = letter + suffix
    values = [v for trace in fig.data if trace.get(letter + "axis", letter) == ref for v in (trace.get(letter) if trace.get(letter) is not None else [])]
    if values and all(isinstance(v, str) for v in values):
        return max(len(v.rstrip("\u200b")) for v in values)
    return 4


def _title_of(props: dict) -> str:
    title = props.get("title")
    return (title.get("text") or "") if isinstance(title, dict) else (title or "")


def _margins(fig: Spec) -> dict:
    """Margins that hold every axis's tick labels and title and any colour bar, computed here rather than
    by plotly's automargin (which lays the figure out again for each axis that needs room: ~20% of the
    time from a Step to its figures drawn, in chromium on this project's machine)."""
    size = FONT["size"]
    left, bottom, right = 10, 10, 10
    for axis, props in fig.layout.items():
        if not axis.startswith(("xaxis", "yaxis")) or props.get("visible") is False:
            continue
        font = (props.get("tickfont") or {}).get("size", size)
        labels = 0 if props.get("showticklabels") is False else _tick_chars(fig, axis) * CHAR * font
        titled = bool(_title_of(props))
        if axis.startswith("yaxis"):
            left = max(left, int(labels + (size + 12 if titled else 0) + 14))
        else:
            label_height = labels if props.get("tickangle") in (-90, 90) or not labels else font + 6
            bottom = max(bottom, int(label_height + (size + 12 if titled else 0) + 12))
    for bar in _colorbars(fig):
        ticks = max((len(str(t)) for t in bar.get("ticktext", [])), default=3)
        right = max(right, int(bar.get("thickness", 30) + ticks * CHAR * size + (size + 12 if _title_of(bar) else 0) + 16))
    return dict(l=left, r=right, b=bottom)


def _colorbars(fig: Spec) -> list[dict]:
    bars = [t.get("colorbar", {}) for t in fig.data if t.get("type") == "heatmap" and "coloraxis" not in t]
    bars += [(t.get("marker") or {}).get("colorbar", {}) for t in fig.data if (t.get("marker") or {}).get("showscale")]
    if any("coloraxis" in t for t in fig.data):
        bars.append(fig.layout.get("coloraxis", {}).get("colorbar", {}))
    return bars


def empty_figure(message: str) -> go.Figure:
    fig = Spec()
    fig.add_annotation(text=message, showarrow=False, font=dict(size=15, color="#5b6570"), x=0.5, y=0.5,
                       xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, "", height=200, top=10)


def next_token_figure(tokens: list[str], probs: np.ndarray, probs_final: np.ndarray | None, chosen: int | None,
                      title: str, subtitle: str) -> go.Figure:
    """Bars of the top candidates: the model's probability (grey) beside the final one after the settings (blue).

    tokens `[N]`, probs `[N]`, probs_final `[N]` or None (prompt tokens: only the model's own);
    `chosen` is the index of the token that came next, marked ▶.
    """
    names = unique([("▶ " if i == chosen else "") + short(t, 14) for i, t in enumerate(tokens)])
    fig = Spec()
    fig.add("bar", y=names, x=f32(probs, 4), orientation="h", name="model", marker_color=GREY,
                text=[pct(p) for p in probs], textposition="outside", textfont=dict(size=12), cliponaxis=False,
                hovertemplate="%{y}<br>model: %{text}<extra></extra>")
    top = float(np.max(probs)) if len(probs) else 0.0
    if probs_final is not None:
        fig.add("bar", y=names, x=f32(probs_final, 4), orientation="h", name="after your settings", marker_color=BLUE,
                    text=[pct(p) for p in probs_final], textposition="outside", textfont=dict(size=12), cliponaxis=False,
                    hovertemplate="%{y}<br>after your settings: %{text}<extra></extra>")
        top = max(top, float(np.max(probs_final)) if len(probs_final) else 0.0)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(title="probability", tickformat=".0%", range=[0, min(1.0, top) * 1.3 + 0.03], nticks=6)
    fig.update_layout(barmode="group", bargap=0.25, bargroupgap=0.05)
    per_row = 36 if probs_final is not None else 26
    return _layout(fig, title, subtitle, height=max(300, per_row * len(tokens) + 150))


def attention_heatmap(pattern: np.ndarray, tokens: list[str], start: int, title: str, subtitle: str,
                      selected: int | None = None, compact: bool = False) -> go.Figure:
    """One head's attention `[query, key]` over the window of tokens starting at `start`; every token labelled
    (`compact`: a phone's width, smaller labels)."""
    axis = labels(tokens, start)
    z = np.where(np.tril(np.ones_like(pattern, dtype=bool)), f32(pattern, 3), np.nan)
    fig = Spec().add("heatmap", z=z, x=axis, y=axis, colorscale="Blues", zmin=0, zmax=1,
                     hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>",
                     colorbar=dict(title=dict(text="attention", side="right"), thickness=14))
    ticks = dict(size=10 if compact else 12)
    fig.update_yaxes(autorange="reversed", title="query: the token reading", type="category", tickfont=ticks)
    fig.update_xaxes(title="key: the token read", type="category", tickangle=-90, tickfont=ticks)
    if selected is not None and start <= selected < start + len(tokens):
        _mark_row(fig, axis[selected - start])
    return _layout(fig, title, subtitle, height=max(420, 24 * len(tokens) + 260))


def _mark_row(fig: Spec, category: str, xref: str = "x domain", yref: str = "y") -> None:
    fig.add_shape(type="rect", xref=xref, yref=yref, x0=0, x1=1, y0=category, y1=category,
                  line=dict(color=ORANGE, width=3), layer="above")


GRID_GAP = 3  # empty cells between two heads of the all-heads grid (room for a head's title)


def grid_blocks(n_head: int, n: int, compact: bool = False) -> tuple[int, int, list[tuple[int, int]]]:
    """The all-heads grid's layout: `(columns, rows, [(first row, first column) of each head's n x n block])`."""
    cols = 2 if compact else 3 if n_head <= 12 else 4
    rows = int(np.ceil(n_head / cols))
    return cols, rows, [((h // cols) * (n + GRID_GAP) + GRID_GAP, (h % cols) * (n + 1)) for h in range(n_head)]


def heads_grid(patterns: np.ndarray, tokens: list[str], start: int, title: str, subtitle: str,
               selected: int | None = None, per_head_scale: bool = False, roles: list[str] | None = None,
               compact: bool = False) -> go.Figure:
    """All heads of one layer `[head, query, key]` over one window as small heatmaps, one colour scale.

    Drawn as one heatmap trace with empty cells between the heads (a figure of a dozen subplots takes
    several times longer to build and to draw). Every row and column is labelled: rows at the left of
    each row of heads, columns under the bottom ones. `per_head_scale` divides each head by its own
    largest weight in the window (diffuse heads stay visible); the titles then give each head's
    maximum. `roles`: a badge per head (or ""). `compact`: a phone's width (two columns).
    """
    n_head, n = patterns.shape[0], patterns.shape[1]
    cols, rows, blocks = grid_blocks(n_head, n, compact)
    height, width = rows * (n + GRID_GAP), cols * (n + 1) - 1
    z = np.full((height, width), np.nan, dtype=np.float32)
    mask = np.tril(np.ones((n, n), dtype=bool))
    peak = np.array([float(np.max(patterns[h][mask])) for h in range(n_head)])
    names = []
    for h, (r0, c0) in enumerate(blocks):
        values = patterns[h] / peak[h] if per_head_scale and peak[h] > 0 else patterns[h]
        z[r0:r0 + n, c0:c0 + n] = np.where(mask, f32(values, 2), np.nan)
        badge = f" · {roles[h]}" if roles and roles[h] else ""
        names.append(f"head {h}{badge}" + (f" (max {peak[h]:.2f})" if per_head_scale else ""))
    if compact:
        names = [m.replace("head ", "h").replace(" · ", " ").replace(" (max 0", " ").replace(" (max ", " ").replace(")", "")
                 for m in names]
    fig = Spec().add("heatmap", z=z, coloraxis="coloraxis", hoverongaps=False, xgap=0, ygap=0,
                     hovertemplate="%{z:.2f}<extra></extra>")
    axis = labels(tokens, start, width=8)
    ys = [r0 + i for r0, _ in blocks[::cols] for i in range(n)]
    xs = [c0 + i for _, c0 in blocks[:cols] for i in range(n)]
    small = dict(size=7 if compact else 9 if n > 12 else 10)
    fig.update_yaxes(autorange="reversed", tickmode="array", tickvals=ys, ticktext=axis * rows, tickfont=small,
                     showgrid=False, zeroline=False)
    fig.update_xaxes(tickmode="array", tickvals=xs, ticktext=axis * cols, tickangle=-90, tickfont=small,
                     showgrid=False, zeroline=False, range=[-0.5, width - 0.5])
    fig.update_yaxes(range=[height - 0.5, -0.5])
    notes = [dict(x=c0 + (n - 1) / 2, y=r0 - 1.1, text=names[h], showarrow=False, yanchor="bottom",
                  font=dict(size=10 if compact else 12)) for h, (r0, c0) in enumerate(blocks)]
    marks = []
    if selected is not None and start <= selected < start + n:
        marks = [dict(type="rect", x0=c0 - 0.5, x1=c0 + n - 0.5, y0=r0 + selected - start - 0.5, y1=r0 + selected - start + 0.5,
                      line=dict(color=ORANGE, width=2), layer="above") for r0, c0 in blocks]
    fig.update_layout(annotations=notes, shapes=marks)
    scale_title = "÷ head's max" if per_head_scale else "attention"
    fig.update_layout(coloraxis=dict(colorscale="Blues", cmin=0, cmax=1,
                                     colorbar=dict(title=dict(text=scale_title, side="right"), thickness=12)))
    cell = 11 if compact else 13
    return _layout(fig, title, subtitle, height=height * cell + 260, top=TITLE_SPACE + 8)


def attention_row_figure(row: np.ndarray, tokens: list[str], start: int, title: str, subtitle: str) -> go.Figure:
    """The selected token's attention over earlier tokens: per head `[head, key]` and the mean over heads."""
    axis = labels(tokens, start)
    # two rows sharing the key axis: the bars' domain is the top 32% less half the gap of 0.1, the heatmap's the rest
    top, bottom = [0.712, 1.0], [0.0, 0.612]
    fig = Spec().update_layout(
        xaxis=dict(anchor="y", domain=[0.0, 1.0], matches="x2", showticklabels=False), yaxis=dict(anchor="x", domain=top),
        xaxis2=dict(anchor="y2", domain=[0.0, 1.0]), yaxis2=dict(anchor="x2", domain=bottom),
        annotations=[dict(text=text, x=0.5, y=y, xref="paper", yref="paper", xanchor="center", yanchor="bottom",
                          showarrow=False, font=dict(size=12))
                     for text, y in (("average over heads", top[1]), ("each head", bottom[1]))])
    fig.add("bar", x=axis, y=f32(row.mean(0), 3), marker_color=BLUE, name="average", xaxis="x", yaxis="y",
            hovertemplate="key %{x}<br>average attention %{y:.3f}<extra></extra>")
    fig.add("heatmap", z=f32(row, 3), x=axis, y=[f"head {h}" for h in range(row.shape[0])], xaxis="x2", yaxis="y2",
            colorscale="Blues", zmin=0, zmax=1,
            colorbar=dict(title=dict(text="attention", side="right"), y=0, yanchor="bottom", len=0.62, thickness=14),
            hovertemplate="%{y}<br>key %{x}<br>%{z:.3f}<extra></extra>")
    fig.update_xaxes("xaxis2", type="category", tickangle=-90, tickfont=dict(size=12))
    fig.update_yaxes("yaxis", title="attention", range=[0, 1], nticks=3)
    fig.update_yaxes("yaxis2", autorange="reversed", tickfont=dict(size=11))
    return _layout(fig, title, subtitle, height=max(460, 18 * row.shape[0] + 380), top=TITLE_SPACE + 10)


def logit_lens_figure(top_tokens: list[list[str]], top_probs: np.ndarray, layer_names: list[str], tokens: list[str],
                      start: int, next_tokens: list[str], title: str, subtitle: str, compact: bool = False) -> go.Figure:
    """Rows are positions, columns layers: each cell the top next-token guess read from that layer's
    residual stream, coloured by its probability; ✓ where the guess is the actual next token.

    top_tokens `[row][column]` strings, top_probs `[row, column]`, layer_names `[column]`;
    next_tokens `[row]`: the token that actually came next ("" where none has yet), shown in a last,
    uncoloured column "next". `compact`: a phone's width (shorter cell text, no axis titles).
    """
    crowded = len(layer_names) > 10  # 11 or more columns: shorter cell text
    cell_chars = 4 if compact else 5 if crowded else 6
    y = labels(tokens, start, width=6 if compact else 10)
    x = list(layer_names) + ["next"]
    text = []
    for w, row in enumerate(top_tokens):
        cells = [("✓" if next_tokens[w] and t == next_tokens[w] else "") + short(t, cell_chars) for t in row]
        text.append(cells + [short(next_tokens[w], cell_chars) if next_tokens[w] else "?"])
    z = np.concatenate([f32(top_probs, 3), np.full((len(y), 1), np.nan, np.float32)], axis=1)
    custom = [[short(nt, 14) or "(not written yet)"] * len(x) for nt in next_tokens]
    fig = Spec().add(
        "heatmap", z=z, x=x, y=y, text=text, texttemplate="%{text}", textfont=dict(size=10 if compact or crowded else 11),
        xgap=1, ygap=1, colorscale="YlGnBu", zmin=0, zmax=1, customdata=custom,
        colorbar=dict(title=dict(text="" if compact else "probability", side="right"), thickness=10,
                      tickvals=[0, 0.5, 1], ticktext=["0", "½", "1"] if compact else ["0", "0.5", "1"]),
        hovertemplate="reading %{y}<br>layer %{x}: top guess %{text} (%{z:.1%})<br>actual next token: %{customdata}<extra></extra>")
    return _lens_layout(fig, title, subtitle, len(tokens), "next: the actual next token", compact)


def _lens_layout(fig: Spec, title: str, subtitle: str, rows: int, last_column: str, compact: bool) -> go.Figure:
    """The axes of the lens's figures: columns are layers (and a last, explained column), rows positions."""
    fig.update_xaxes(type="category", title="layer" if compact else f"layer (emb: the embeddings) · {last_column}",
                     side="bottom", tickfont=dict(size=11 if compact else 12))
    fig.update_yaxes(type="category", autorange="reversed", title=None if compact else "position (the token read)",
                     tickfont=dict(size=11 if compact else 12))
    return _layout(fig, title, subtitle, height=max(360, 30 * rows + 230))


def embedding_figure(embed: np.ndarray, pos_embed: np.ndarray, title: str, subtitle: str) -> go.Figure:
    """The token embedding (blue) and position embedding (orange) of one token, dimension by dimension `[d_model]`."""
    dims = np.arange(embed.shape[0])
    fig = Spec()
    fig.add("scatter", x=dims, y=f32(embed, 3), name="token embedding", mode="lines", line=dict(color=BLUE))
    fig.add("scatter", x=dims, y=f32(pos_embed, 3), name="position embedding", mode="lines", line=dict(color=ORANGE))
    fig.update_xaxes(title="dimension")
    fig.update_yaxes(title="value")
    return _layout(fig, title, subtitle, height=340)


def resid_norm_figure(norms: np.ndarray, title: str, subtitle: str) -> go.Figure:
    """Length of the residual stream `[layer + 1]` after the embeddings and after each block."""
    x = ["emb"] + [str(i) for i in range(len(norms) - 1)]
    fig = Spec().add("scatter", x=x, y=f32(norms, 3), mode="lines+markers", line=dict(color=BLUE),
                     hovertemplate="after %{x}<br>length %{y:.2f}<extra></extra>")
    fig.update_xaxes(type="category", title="after the embeddings (emb) or block n", tickfont=dict(size=12))
    fig.update_yaxes(title="length (L2 norm)", rangemode="tozero")
    return _layout(fig, title, subtitle, height=320)


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


def trajectory_figure(resid: np.ndarray, lens_guess: list[str], title: str, subtitle: str) -> go.Figure:
    """2-D PCA path of one token's residual stream `[layer + 1, d_model]`; the colour is the layer,
    and hovering a point gives the logit lens's top next-token guess there (`lens_guess[layer + 1]`)."""
    coords, ratio = pca_2d(resid)
    names = ["embeddings"] + [f"after block {i}" for i in range(len(resid) - 1)]
    fig = Spec().add(
        "scatter", x=f32(coords[:, 0]), y=f32(coords[:, 1]), mode="lines+markers",
        marker=dict(size=11, color=np.arange(len(coords)), colorscale="Viridis", showscale=True,
                    colorbar=dict(title=dict(text="layer", side="right"), thickness=14,
                                  tickvals=[0, len(coords) - 1], ticktext=["emb", str(len(coords) - 2)])),
        line=dict(color=GREY), customdata=[[n, show(t)] for n, t in zip(names, lens_guess)],
        hovertemplate="%{customdata[0]}<br>logit lens guess: %{customdata[1]}<extra></extra>")
    fig.update_xaxes(title=f"PC 1 ({ratio[0]:.0%} of the variance)", zeroline=False, nticks=4)
    fig.update_yaxes(title=f"PC 2 ({ratio[1]:.0%})", zeroline=False)
    return _layout(fig, title, subtitle, height=440)


def png_data_uri(rgb: np.ndarray) -> str:
    """`[h, w, 3]` uint8 -> a `data:image/png;base64,...` URI (no imaging library needed)."""
    import base64
    import struct
    import zlib

    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def blues(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Values in [0, 1] `[h, w]` -> white..dark blue RGB `[h, w, 3]` uint8; light grey where `mask` is False."""
    low, high = np.array([247, 251, 255], np.float32), np.array([8, 48, 107], np.float32)
    v = np.clip(np.nan_to_num(values), 0, 1)[..., None] ** 0.7  # a gentle gamma keeps weak attention visible
    rgb = low + (high - low) * v
    rgb[~mask] = (236, 238, 241)
    return rgb.round().astype(np.uint8)


def heads_overview_html(patterns: np.ndarray, badges: dict[tuple[int, int], str], selected: tuple[int, int], title: str) -> str:
    """Every head of every layer at a glance: `patterns` `[layer, head, query, key]` over one window as a
    grid of thumbnails (rows layers, columns heads), each scaled to its own maximum, role badges under
    them, the selected head outlined. Clicking one selects it (`data-layer`, `data-head`)."""
    import html

    n_layer, n_head, n, _ = patterns.shape
    mask = np.tril(np.ones((n, n), dtype=bool))
    cells = ['<div class="ov-corner">layer \\ head</div>'] + [f'<div class="ov-col">{h}</div>' for h in range(n_head)]
    for layer in range(n_layer):
        cells.append(f'<div class="ov-row">{layer}</div>')
        for h in range(n_head):
            p = patterns[layer, h]
            peak = float(p[mask].max()) or 1.0
            badge = badges.get((layer, h), "")
            sel = " ov-sel" if (layer, h) == tuple(selected) else ""
            tip = f"layer {layer}, head {h}" + (f" ({badge})" if badge else "") + f": strongest weight {peak:.2f}"
            cells.append(f'<button class="ov-cell{sel}" data-layer="{layer}" data-head="{h}" title="{html.escape(tip)}">'
                         f'<img alt="{html.escape(tip)}" src="{png_data_uri(blues(p / peak, mask))}">'
                         f'<span class="ov-badge">{html.escape(badge)}</span></button>')
    return (f'<div class="overview"><div class="ov-title">{html.escape(title)}</div>'
            f'<div class="ov-note">Each square is one head\'s attention (rows: tokens reading, columns: tokens read), '
            f'scaled to its own strongest weight. Badges: prev = previous-token head, dup = duplicate-token head, '
            f'ind = induction head (measured on repeated random tokens). Click a head to open it in the Attention tab.</div>'
            f'<div class="ov-grid" style="grid-template-columns: 3.2em repeat({n_head}, minmax(0, 1fr))">'
            + "".join(cells) + "</div></div>")


def compare_bars_figure(tokens: list[str], p_original: np.ndarray, p_intervened: np.ndarray, chosen: int | None,
                        title: str, subtitle: str) -> go.Figure:
    """The same candidates' probabilities under the model (grey) and with the interventions (orange).

    tokens `[N]`, p_original `[N]`, p_intervened `[N]`; `chosen` is the index of the token that came next (▶).
    """
    names = unique([("▶ " if i == chosen else "") + short(t, 14) for i, t in enumerate(tokens)])
    fig = Spec()
    for probs, name, colour in ((p_original, "the model", GREY), (p_intervened, "with your interventions", ORANGE)):
        fig.add("bar", y=names, x=f32(probs, 4), orientation="h", name=name, marker_color=colour,
                    text=[pct(p) for p in probs], textposition="outside", textfont=dict(size=12), cliponaxis=False,
                    hovertemplate="%{y}<br>" + name + ": %{text}<extra></extra>")
    top = max(float(np.max(p_original)) if len(p_original) else 0.0, float(np.max(p_intervened)) if len(p_intervened) else 0.0)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(title="probability", tickformat=".0%", range=[0, min(1.0, top) * 1.3 + 0.03], nticks=6)
    fig.update_layout(barmode="group", bargap=0.25, bargroupgap=0.05)
    return _layout(fig, title, subtitle, height=max(300, 36 * len(tokens) + 150))


def surprisal_figure(surprisal_original: np.ndarray, surprisal_intervened: np.ndarray, prompt_length: int,
                     divergence: int | None, title: str, subtitle: str) -> go.Figure:
    """Per position t >= 1 of a text, -log p(token t) under the model (grey) and with the interventions (orange).

    Both `[T]` (NaN at t = 0); a dotted line where the generated tokens start, ✕ where the runs first differ.
    """
    x = np.arange(1, len(surprisal_original))
    fig = Spec()
    for values, name, colour in ((surprisal_original, "the model", GREY), (surprisal_intervened, "with your interventions", ORANGE)):
        fig.add("scatter", x=x, y=f32(values[1:], 2), mode="lines+markers", name=name, line=dict(color=colour, width=2),
                        marker=dict(size=5), hovertemplate="token %{x}<br>" + name + ": %{y:.2f} nats<extra></extra>")
    top = float(np.nanmax(np.concatenate([surprisal_original[1:], surprisal_intervened[1:]]))) if len(x) else 1.0
    if prompt_length < len(surprisal_original):
        fig.add_shape(type="line", xref="x", yref="y domain", x0=prompt_length - 0.5, x1=prompt_length - 0.5, y0=0, y1=1,
                      line=dict(color="#4a5561", dash="dot", width=1))
    if divergence is not None:
        fig.add("scatter", x=[divergence], y=[top * 1.05], mode="markers", marker=dict(symbol="x", size=12, color="#c0392b"),
                        hovertemplate="the runs first differ here (token %{x})<extra></extra>")
    fig.update_xaxes(title="position in the original text", range=[0.5, max(len(surprisal_original) - 0.5, 1.5)])  # no 0 tick beside the y axis's
    fig.update_yaxes(title="surprise, nats (−log p)", rangemode="tozero")
    return _layout(fig, title, subtitle, height=360)


def lens_values_figure(values: np.ndarray, text: list[list[str]], layer_names: list[str], tokens: list[str], start: int,
                       final: list[str], title: str, subtitle: str, scale_title: str, colorscale: str,
                       compact: bool = False) -> go.Figure:
    """The logit lens as numbers: rows positions, columns layers, `values` `[row, column]` coloured and written
    (`text`), the model's final top guess for each row in a last, uncoloured column "final"."""
    y = labels(tokens, start, width=6 if compact else 10)
    x = list(layer_names) + ["final"]
    z = np.concatenate([f32(values, 3), np.full((len(y), 1), np.nan, np.float32)], axis=1)
    cells = [row + [short(f, 4 if compact else 6)] for row, f in zip(text, final)]
    fig = Spec().add(
        "heatmap", z=z, x=x, y=y, text=cells, texttemplate="%{text}", textfont=dict(size=10 if compact or len(x) > 11 else 11),
        xgap=1, ygap=1, colorscale=colorscale, customdata=[[short(f, 14)] * len(x) for f in final],
        colorbar=dict(title=dict(text="" if compact else scale_title, side="right"), thickness=10),
        hovertemplate="reading %{y}<br>layer %{x}: %{text}<br>the final guess: %{customdata}<extra></extra>")
    return _lens_layout(fig, title, subtitle, len(tokens), "final: the model's top guess", compact)
