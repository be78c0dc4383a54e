"""A printable handout of a page: one A4 or Letter sheet, drawn with matplotlib on the server (static, in
greys so that it survives a black-and-white printer), as PDF or PNG.

`render` is a pure function of a `Handout` (numbers and token labels gathered by `export.handout_data`
from the page's session): the text as tokens with their probabilities, the upcoming-token table, the
selected head's attention, the logit lens window, and the settings and link that reproduce the page.
"""

from __future__ import annotations

import io
import textwrap
import warnings
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

PAPER = {"a4": (8.27, 11.69), "letter": (8.5, 11.0)}  # inches, portrait
FORMATS = ("pdf", "png")
PNG_DPI = 150
MONO = "DejaVu Sans Mono"
# (lowest probability, grey fill, what it means): black text stays legible on every fill
SHADES = [(0.5, "1.0", "likely (> 50%)"), (0.1, "0.86", "plausible (10–50%)"), (0.01, "0.7", "unlikely (1–10%)"),
          (0.0, "0.55", "surprising (< 1%)")]


@dataclass
class Handout:
    """What a handout prints (token labels as the page shows them: spaces as ·, newlines as ↵)."""

    title: str  # e.g. "gpt2viz · tiny-shakespeare"
    settings: str  # the sampling settings in words
    tokens: list[str]
    probs: list[float | None]  # the probability the model gave each token (None: the first)
    n_prompt: int
    selected: int
    upcoming_title: str
    upcoming: list[tuple[str, float, float]]  # (token, model's probability, after the settings)
    attention_title: str
    attention: np.ndarray  # [W, W] the selected head over the window (query rows, key columns)
    attention_labels: list[str]
    attention_start: int
    lens_title: str
    lens_guesses: list[list[str]]  # [layer row][position]
    lens_probs: np.ndarray  # [layer rows, W]
    lens_hits: np.ndarray  # [layer rows, W] bool: the guess is the token that came next
    lens_layers: list[str]
    lens_tokens: list[str]
    lens_start: int
    link: str


def _shade(p: float | None) -> str:
    if p is None:
        return "0.93"
    return next(fill for low, fill, _ in SHADES if p >= low)


def _pct(p: float) -> str:
    return "0%" if p <= 0 else "<0.1%" if p < 0.001 else f"{p:.1%}" if p < 0.995 else f"{p:.0%}"


def _cut(label: str, width: int) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def _strip(fig: Figure, h: Handout, rect: tuple[float, float, float, float], size: tuple[float, float]) -> None:
    """The text as token boxes, each with its probability under it; the latest tokens that fit."""
    ax = fig.add_axes(rect)
    ax.set_axis_off()
    width_pt, height_pt = rect[2] * size[0] * 72, rect[3] * size[1] * 72
    ax.set_xlim(0, width_pt)
    ax.set_ylim(height_pt, 0)
    font, char = 8.0, 8.0 * 0.602  # DejaVu Sans Mono's advance is 0.602 em
    line = 25.0
    lines_max = int((height_pt - 10) // line)

    def layout(first: int):
        x, y, boxes = 0.0, 0, []
        for i in range(first, len(h.tokens)):
            label = _cut(h.tokens[i], 24)
            w = max(len(label), 4) * char + 5
            if x + w > width_pt:
                x, y = 0.0, y + 1
            boxes.append((i, label, x, y, w))
            x += w + 3  # a newline token shows as ↵ and the text flows on: paper is scarcer than screen
        return boxes, y + 1

    first = 0
    boxes, n_lines = layout(first)
    while n_lines > lines_max and first < len(h.tokens) - 1:
        first += max(1, (n_lines - lines_max) * 2)
        boxes, n_lines = layout(first)
    for i, label, x, y, w in boxes:
        top = y * line
        generated = i >= h.n_prompt
        ax.add_patch(_box(x, top, w, 13, _shade(h.probs[i]), 1.6 if i == h.selected else 0.6, "-" if generated else "--"))
        ax.text(x + 2.5, top + 6.5, label, fontsize=font, family=MONO, va="center", ha="left",
                fontweight="bold" if i == h.selected else "normal")
        ax.text(x + 2.5, top + 19.5, "first" if h.probs[i] is None else _pct(h.probs[i]), fontsize=5.5, va="center", ha="left",
                color="0.25")
    if first:
        ax.text(0, n_lines * line + 2, f"(the first {first} tokens are left out: the text is longer than this box)", fontsize=6,
                va="top", color="0.3")


def _box(x, y, w, hgt, fill, lw, style):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, hgt, facecolor=fill, edgecolor="black", linewidth=lw, linestyle=style)


def _upcoming(fig: Figure, h: Handout, rect) -> None:
    ax = fig.add_axes(rect)
    rows = h.upcoming[:10]
    y = np.arange(len(rows))
    model = [r[1] for r in rows]
    final = [r[2] for r in rows]
    ax.barh(y - 0.18, model, height=0.34, color="0.75", edgecolor="black", linewidth=0.4, label="the model")
    ax.barh(y + 0.18, final, height=0.34, color="0.25", edgecolor="black", linewidth=0.4, label="after the settings")
    ax.set_yticks(y, [_cut(r[0], 14) for r in rows], family=MONO, fontsize=7)
    ax.invert_yaxis()
    top = max(model + final + [1e-9])
    ax.set_xlim(0, top * 1.45)
    for yi, m, f in zip(y, model, final):
        ax.text(m + top * 0.02, yi - 0.18, _pct(m), va="center", fontsize=5.5)
        ax.text(f + top * 0.02, yi + 0.18, _pct(f), va="center", fontsize=5.5)
    ax.set_xticks([])
    ax.spines[["top", "right", "bottom"]].set_visible(False)
    ax.set_title(h.upcoming_title, fontsize=9, loc="left")
    ax.legend(fontsize=6, loc="lower right", frameon=False)


def _attention(fig: Figure, h: Handout, rect) -> None:
    ax = fig.add_axes(rect)
    a = h.attention
    W = a.shape[0]
    ax.imshow(a, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    labels = [f"{h.attention_start + i} {_cut(t, 8)}" for i, t in enumerate(h.attention_labels)]
    ax.set_xticks(range(W), labels, rotation=90, family=MONO, fontsize=5.5)
    ax.set_yticks(range(W), labels, family=MONO, fontsize=5.5)
    sel = h.selected - h.attention_start
    if 0 <= sel < W:
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((-0.5, sel - 0.5), W, 1, fill=False, edgecolor="black", linewidth=1.4))
    ax.set_title(h.attention_title, fontsize=9, loc="left")
    ax.set_xlabel("key (the token read)", fontsize=6)
    ax.set_ylabel("query (the token reading)", fontsize=6)


def _lens(fig: Figure, h: Handout, rect) -> None:
    ax = fig.add_axes(rect)
    p = h.lens_probs
    R, W = p.shape
    ax.imshow(p, cmap="Greys", vmin=0, vmax=1.6, aspect="auto", interpolation="nearest")  # vmax > 1: text stays readable
    for r in range(R):
        for w in range(W):
            ax.text(w, r, _cut(h.lens_guesses[r][w], 9) + (" ✓" if h.lens_hits[r, w] else ""), ha="center", va="center",
                    fontsize=5.5, family=MONO, fontweight="bold" if h.lens_hits[r, w] else "normal")
    ax.set_yticks(range(R), h.lens_layers, fontsize=6)
    ax.set_xticks(range(W), [f"{h.lens_start + i} {_cut(t, 9)}" for i, t in enumerate(h.lens_tokens)], family=MONO, fontsize=6,
                  rotation=30, ha="right")
    ax.set_ylabel("layer (emb: embeddings)", fontsize=6)
    ax.set_title(h.lens_title, fontsize=9, loc="left")


def render(h: Handout, paper: str = "a4", fmt: str = "pdf") -> bytes:
    """The handout as PDF or PNG bytes on A4 or Letter paper."""
    if paper not in PAPER:
        raise ValueError(f"paper must be one of {sorted(PAPER)}, got {paper!r}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    size = PAPER[paper]
    fig = Figure(figsize=size)
    fig.text(0.05, 0.975, h.title, fontsize=14, fontweight="bold", va="top")
    fig.text(0.05, 0.952, h.settings, fontsize=8, va="top", color="0.2")
    fig.text(0.05, 0.935, "The text as GPT-2's tokens, each with the probability the model gave it (the first has none). "
             "Solid border: generated; dashed: your prompt; bold: the selected token.", fontsize=6.5, va="top", color="0.2")
    key = "   ".join(f"{fill_name}" for _, _, fill_name in SHADES)
    fig.text(0.05, 0.922, "Fill, light to dark: " + key, fontsize=6.5, va="top", color="0.2")
    _strip(fig, h, (0.05, 0.70, 0.90, 0.21), size)
    _upcoming(fig, h, (0.14, 0.42, 0.31, 0.23))
    _attention(fig, h, (0.60, 0.45, 0.35, 0.20))
    _lens(fig, h, (0.12, 0.19, 0.83, 0.19))
    link = h.link or "(no link: the page had no text)"
    lines = textwrap.wrap(link, 150, break_on_hyphens=False) or [link]  # a 200-token run's link is ~1,200 characters
    if len(lines) > 10:
        lines = lines[:9] + ["… (the link is too long to print in full: copy it from the page, or use the Python script)"]
    fig.text(0.05, 0.105, "To open this page again, open this link (it replays the text, settings and view):", fontsize=6.5,
             va="top")
    fig.text(0.05, 0.093, "\n".join(lines), fontsize=5.2, family=MONO, va="top", linespacing=1.15)
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a glyph the font lacks prints as a box, not a warning in the log
        fig.savefig(out, format=fmt, dpi=PNG_DPI, metadata={"Creator": "gpt2viz"} if fmt == "pdf" else None)
    return out.getvalue()
