"""Downloads of a page: its tables as CSV, the whole run as a `.npz` (numpy arrays only), and a Python script
that recreates the run with gpt2viz's public API and prints the numbers of the selected view.

Everything is computed from the page's own recording session (the same numbers the views show), and from a
`share.Shared` state for the script, whose every field `share.check` validated: the script's literals are
written with `repr` of checked strings and numbers, so nothing a user typed becomes code.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np

from .generation import GenerationSession
from .plots import show
from .share import SETTING_NAMES, Shared, check
from .tokenizer import token_strings

NPZ_README = """gpt2viz run: numpy arrays, loadable with numpy.load alone (no pickle).
L layers, H heads, T tokens, C the model's width, N = 5 lens candidates.

tokens         [T] int64     the text's token ids (the prompt, then each generated token)
token_strings  [T] str       each token as text
methods        [T] str       how each token came: prompt, sampled, greedy or forced (chosen by the user)
logprobs       [T] float32   log p(token t | tokens before it), natural log; NaN at t = 0
attention      [L, H, T, T]  float16: attention of each query (row) over each key (column); rows sum to 1
resid          [L + 1, T, C] float32: the residual stream after the embeddings, then after each block
embed          [T, C]        float32: token embeddings;  pos_embed [T, C] float32: position embeddings
lens_ids       [L + 1, T, N] int32: logit lens, the top-N next-token guesses read from each resid row
lens_probs     [L + 1, T, N] float32: their probabilities (softmax of ln_f(resid) @ W_U)
meta           str           JSON: model, prompt length, sampling settings
"""


def _rows_csv(header: list[str], rows: list[list]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def upcoming_csv(session: GenerationSession) -> str:
    """The upcoming token's table (the Upcoming chart and the picker): every candidate the page lists, with the
    model's probability and the probability after the session's sampling settings."""
    pred = session.peek()
    rows = [[rank, c.token_id, c.text, f"{c.logit:.6g}", f"{c.prob:.6g}", f"{c.prob_final:.6g}"]
            for rank, c in enumerate(pred.candidates, 1)]
    return _rows_csv(["rank", "token_id", "token", "logit", "model_probability", "probability_after_settings"], rows)


def lens_csv(session: GenerationSession, start: int, end: int) -> str:
    """The logit lens over positions start..end-1, every layer: each layer's top guess for the next token."""
    ids, probs = session.logit_lens(start, end)  # [layer + 1, W, 1]
    strings = token_strings(session.tokenizer, session.ids[start:end])
    nxt = session.ids[start + 1: end + 1]
    rows = []
    for w, p in enumerate(range(start, end)):
        following = nxt[w] if w < len(nxt) else None
        for layer in range(ids.shape[0]):
            guess = int(ids[layer, w, 0])
            rows.append([p, strings[w], "embeddings" if layer == 0 else f"block {layer - 1}", guess,
                         token_strings(session.tokenizer, [guess])[0], f"{float(probs[layer, w, 0]):.6g}",
                         "" if following is None else int(guess == following)])
    return _rows_csv(["position", "token", "layer", "guess_id", "guess", "probability", "guess_is_next_token"], rows)


def run_arrays(session: GenerationSession, model_name: str, lens_top: int = 5) -> dict[str, np.ndarray]:
    """Every array of the `.npz` (see NPZ_README), from the session's recording."""
    session.read()
    n = len(session.ids)
    rec = session.records
    L = session.model.cfg.n_layer
    attention = np.stack([session.attention_pattern(layer, 0, n) for layer in range(L)]).astype(np.float16)
    lens_ids, lens_probs = session.logit_lens(0, n, top_n=lens_top)
    n_prompt = len(session.prompt_ids)
    methods = ["prompt"] * n_prompt + [st.method for st in session.steps]
    meta = {"model": model_name, "prompt_length": n_prompt,
            "settings": {k: getattr(session.config, k) for k in SETTING_NAMES}, "format": "gpt2viz-run-1"}
    return {
        "tokens": np.asarray(session.ids, dtype=np.int64),
        "token_strings": np.asarray(token_strings(session.tokenizer, session.ids), dtype=str),
        "methods": np.asarray(methods, dtype=str),
        "logprobs": np.asarray(rec.logprobs[:n], dtype=np.float32),
        "attention": attention,
        "resid": np.stack([rec.resid[p] for p in range(n)], axis=1).astype(np.float32),
        "embed": np.stack([rec.embed[p] for p in range(n)]).astype(np.float32),
        "pos_embed": np.stack([rec.pos_embed[p] for p in range(n)]).astype(np.float32),
        "lens_ids": np.asarray(lens_ids, dtype=np.int32),
        "lens_probs": np.asarray(lens_probs, dtype=np.float32),
        "meta": np.asarray(json.dumps(meta)),
        "README": np.asarray(NPZ_README),
    }


def run_npz(session: GenerationSession, model_name: str) -> bytes:
    """The `.npz` archive of `run_arrays` (compressed: attention's upper half is zeros)."""
    out = io.BytesIO()
    np.savez_compressed(out, **run_arrays(session, model_name))
    return out.getvalue()


VIEWS_IN_SCRIPT = {"chosen": "the distribution the selected token came from", "attention": "the selected head's attention row",
                   "overview": "the selected token's attention in every head of the selected layer",
                   "lens": "the logit lens at the selected token", "embed": "the residual stream's length at the selected token",
                   "why": "the parts of the selected token's logit difference", "experiment": "the experiment's report"}


def script(shared: Shared, versus: int | None = None) -> str:
    """A Python script that recreates the page `shared` describes with gpt2viz's public API and prints the
    numbers of its selected view (`shared.tab`, position, layer, head)."""
    check(shared)
    tab = shared.tab if shared.tab in VIEWS_IN_SCRIPT else "chosen"
    settings = ", ".join(f"{k}={shared.settings[k]!r}" for k in SETTING_NAMES)
    pos = "len(session.ids) - 1" if shared.position is None else repr(int(shared.position))
    lines = [
        f'"""Recreates a gpt2viz page ({shared.model}, {len(shared.tokens)} generated tokens) and prints {VIEWS_IN_SCRIPT[tab]}.',
        "Run it where gpt2viz is installed (its repository: pip install -r requirements.txt)."
        ' Numbers print as probabilities in [0, 1]; the page shows them as percentages."""',
        "import torch",
        "",
        "from gpt2viz import GenerationSession, SamplingConfig, load_model, load_tokenizer",
        "",
        (f"model = load_model({shared.model.removeprefix('local: ')!r})  # the server's own folder of this name: give its path"
         if shared.model.startswith("local: ") else f"model = load_model({shared.model!r})"),
        "tok = load_tokenizer()",
        f"config = SamplingConfig({settings})",
        f"PROMPT = {shared.prompt!r}",
        f"TOKENS = {list(shared.tokens)!r}  # the generated tokens, in order",
        f"METHODS = {shared.methods!r}  # s: sampled, g: greedy, f: chosen by the user",
        "",
        "session = GenerationSession(model, tok, PROMPT, config, record=True)",
        "for token, how in zip(TOKENS, METHODS):",
        '    step = session.step(force=token if how == "f" else None)',
        "    if step.token_id != token:  # a draw this machine rounds the other way: keep the page's branch",
        "        session.rewind(len(session.steps) - 1)",
        "        session.step(force=token)",
        "session.read()",
        f"position, layer, head = min({pos}, len(session.ids) - 1), {int(shared.layer)!r}, {int(shared.head)!r}",
        "text = lambda ids: [tok.decode([i]) for i in ids]",
        'print(f"token {position}: {tok.decode([session.ids[position]])!r}")',
    ]
    lines += _VIEW_CODE[tab](shared, versus)
    return "\n".join(lines) + "\n"


def _chosen_code(shared, versus) -> list[str]:
    return [
        "n_prompt = len(session.prompt_ids)",
        "if position == 0:",
        '    print("the first token: nothing came before it")',
        "elif position >= n_prompt:  # a generated token: the candidates it was drawn from",
        "    step = session.steps[position - n_prompt]",
        '    print(f"chosen: {step.method}")',
        "    for c in step.candidates:",
        '        print(f"{c.text!r}\\tmodel {c.prob:.6f}\\tafter settings {c.prob_final:.6f}")',
        "else:  # a prompt token: what the model predicted there",
        "    probs = session.model_distribution(position - 1)",
        "    top = torch.topk(probs, 10).indices.tolist()",
        "    for i in top:",
        '        print(f"{tok.decode([i])!r}\\tmodel {float(probs[i]):.6f}")',
    ]


def _attention_code(shared, versus) -> list[str]:
    return [
        "row = session.attention_pattern(layer, position, position + 1)[head, 0]  # over keys 0..position",
        'print(f"layer {layer}, head {head}: what token {position} reads")',
        "for key, (t, w) in enumerate(zip(text(session.ids[: position + 1]), row)):",
        '    print(f"{key}\\t{t!r}\\t{w:.6f}")',
    ]


def _overview_code(shared, versus) -> list[str]:
    return [
        "rows = session.attention_pattern(layer, position, position + 1)[:, 0]  # [head, key]",
        "for h, row in enumerate(rows):",
        '    print(f"layer {layer}, head {h}: " + " ".join(f"{w:.4f}" for w in row))',
    ]


def _lens_code(shared, versus) -> list[str]:
    return [
        "ids, probs = session.logit_lens(position, position + 1)  # [layer + 1, 1, 1]",
        'print(f"logit lens at token {position}: each layer\'s top guess for the next token")',
        "for r in range(ids.shape[0]):",
        '    name = "emb" if r == 0 else f"block {r - 1}"',
        '    print(f"{name}\\t{tok.decode([int(ids[r, 0, 0])])!r}\\t{float(probs[r, 0, 0]):.6f}")',
    ]


def _embed_code(shared, versus) -> list[str]:
    return [
        "import numpy as np",
        "resid = session.records.resid[position]  # [layer + 1, d_model]",
        "for r, norm in enumerate(np.linalg.norm(resid, axis=-1)):",
        '    print(f"{\'emb\' if r == 0 else f\'block {r - 1}\'}\\t{norm:.4f}")',
    ]


def _why_code(shared, versus) -> list[str]:
    return [
        "from gpt2viz.attribution import attribution",
        "",
        "if position == 0:",
        '    raise SystemExit("the first token: nothing came before it to explain")',
        f"a = attribution(session, position - 1, session.ids[position], {versus!r})  # None: the runner-up",
        'print(f"logit difference {a.logit_diff:.6f} against {tok.decode([a.baseline])!r}; the parts sum to {a.parts_sum:.6f}")',
        "for name, value in a.top(10):",
        '    print(f"{name}\\t{value:.6f}")',
    ]


def _experiment_code(shared, versus) -> list[str]:
    if not shared.interventions:
        return ['print("no experiment on this page")']
    from .interventions import to_dict

    values = json.dumps([to_dict(iv) for iv in shared.interventions])
    return [
        "import dataclasses",
        "import json",
        "",
        "from gpt2viz.compare import compare",
        "from gpt2viz.interventions import from_dict",
        "",
        f"interventions = [from_dict(d) for d in json.loads({values!r})]  # parsed, checked field by field",
        "# as many tokens as the page generated (or the max new tokens), the tokens chosen by hand forced in both runs",
        "n = min(len(TOKENS) or config.max_new_tokens, model.cfg.n_positions - len(session.prompt_ids))",
        'force = {i: t for i, (t, how) in enumerate(zip(TOKENS[:n], METHODS)) if how == "f"}',
        "report = compare(model, tok, PROMPT, dataclasses.replace(config, max_new_tokens=n), interventions, force=force)",
        'print(f"loss on the prompt: {report.prompt_loss_original:.6f} -> {report.prompt_loss_intervened:.6f}")',
        'print(f"first difference: {report.first_divergence}")',
        'print("original:", repr(report.original_text))',
        'print("changed: ", repr(report.intervened_text))',
    ]


_VIEW_CODE = {"chosen": _chosen_code, "attention": _attention_code, "overview": _overview_code, "lens": _lens_code,
              "embed": _embed_code, "why": _why_code, "experiment": _experiment_code}



def handout_data(session: GenerationSession, model_name: str, position: int, layer: int, head: int, link: str,
                 attention_window: tuple[int, int], lens_window: tuple[int, int], lens_rows: list[int]):
    """The numbers a handout prints (`handout.Handout`), from the page's session and its views' windows."""
    from .handout import Handout

    session.read()
    tok, cfg = session.tokenizer, session.config
    labels = [show(t) for t in token_strings(tok, session.ids)]
    rec = session.records
    probs = [None if i == 0 or np.isnan(rec.logprobs[i]) else float(np.exp(rec.logprobs[i])) for i in range(len(session.ids))]
    if session.room_left > 0:
        pred = session.peek()
        upcoming = [(show(c.text), c.prob, c.prob_final) for c in pred.candidates]
        upcoming_title = f"Upcoming: token {pred.position + 1}"
    else:
        upcoming, upcoming_title = [], "Upcoming: none (the text fills the model's context)"
    s, e = attention_window
    attention = session.attention_pattern(layer, s, e)[head, :, s:e]
    ls, le = lens_window
    ids, lens_probs = session.logit_lens(ls, le)  # [layer + 1, W, 1]
    guesses = [[show(t) for t in token_strings(tok, ids[r, :, 0].tolist())] for r in lens_rows]
    following = np.array(session.ids[ls + 1: le + 1] + [-1] * (le - ls - len(session.ids[ls + 1: le + 1])))
    hits = np.stack([ids[r, :, 0] == following for r in lens_rows])
    if cfg.greedy:
        words = "temperature 0 (greedy)"
    else:
        words = f"temperature {cfg.temperature:g}, top-k {cfg.top_k or 'off'}, top-p {cfg.top_p:g}, seed {cfg.seed}"
    if cfg.repetition_penalty != 1:
        words += f", repetition penalty {cfg.repetition_penalty:g}"
    n_prompt = len(session.prompt_ids)
    return Handout(
        title=f"gpt2viz · {model_name}", settings=f"{len(session.ids)} tokens ({n_prompt} of the prompt) · {words}",
        tokens=labels, probs=probs, n_prompt=n_prompt, selected=position,
        upcoming_title=upcoming_title, upcoming=upcoming,
        attention_title=f"Layer {layer}, head {head}: attention (darker: more)", attention=attention,
        attention_labels=labels[s:e], attention_start=s,
        lens_title="Logit lens: each layer's top guess for the next token (darker: more probable; ✓ the token that came next)",
        lens_guesses=guesses, lens_probs=lens_probs[lens_rows, :, 0], lens_hits=hits,
        lens_layers=["emb" if r == 0 else f"{r - 1}" for r in lens_rows], lens_tokens=labels[ls:le], lens_start=ls, link=link)

