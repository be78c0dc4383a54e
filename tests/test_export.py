"""Share and export (gpt2viz/export.py, gpt2viz/handout.py): the Python script, run in a subprocess, prints the
numbers the page's figures show; the .npz reloads to an independent trace's arrays; the tables and the handout."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2viz import GPT2, GPT2Config, load_model, trace
from gpt2viz import controller as c
from gpt2viz.model import init_weights

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [0.9, 0, 1.0, 1.0, 6, 3]
PROMPT = "ROMEO:\nBut soft, what light"


class OneModel:
    def __init__(self, name, model, tokenizer):
        self.name, self.model, self.tokenizer, self.default = name, model, tokenizer, name

    def names(self):
        return [self.name]

    def get(self, name):
        if name != self.name:
            raise c.UserError(f"unknown model {name!r}")
        return self.model


@pytest.fixture(scope="module")
def bundled_ctl(tokenizer):
    models = OneModel("tiny-shakespeare", load_model("tiny-shakespeare"), tokenizer)
    return c.Controller(models, c.Sessions(models))


@pytest.fixture(scope="module")
def run(bundled_ctl):
    """A page with a sampled token, a forced one, a rewind and more sampled tokens."""
    ctl = bundled_ctl
    page = ctl.step(None, "tiny-shakespeare", PROMPT, SETTINGS, c.Selection())
    page = ctl.force(page.state, "tiny-shakespeare", PROMPT, SETTINGS, c.Selection(), page.choices[2][1])
    page = ctl.step(page.state, "tiny-shakespeare", PROMPT, SETTINGS, c.Selection())
    page = ctl.rewind(page.state, "tiny-shakespeare", PROMPT, SETTINGS, c.Selection(), 2)
    for _ in range(3):
        page = ctl.step(page.state, "tiny-shakespeare", PROMPT, SETTINGS, c.Selection())
    return page.state


def run_script(ctl, state, sel: c.Selection, tmp_path) -> list[str]:
    page = ctl.download(state, SETTINGS, sel, "reproduce.py")
    assert not page.warning, page.status
    name, data = page.file
    assert name == "gpt2viz-tiny-shakespeare-reproduce.py"
    path = tmp_path / name
    path.write_bytes(data)
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_the_script_prints_the_numbers_of_the_chosen_view(bundled_ctl, run, tmp_path):
    ctl, state = bundled_ctl, run
    n = len(state["ids"])
    sel = c.Selection(position=n - 2, tab="chosen")
    fig = ctl.select(state, SETTINGS, sel).views["chosen"]
    lines = run_script(ctl, state, sel, tmp_path)
    assert lines[0].startswith(f"token {n - 2}:") and lines[1] == "chosen: sampled"
    printed = [line.split("\t") for line in lines[2:]]
    model = [float(p[1].split()[1]) for p in printed]
    final = [float(p[2].split()[2]) for p in printed]
    np.testing.assert_allclose(model, fig.data[0].x, atol=6e-5)  # the figure's bars, rounded to 4 decimals
    np.testing.assert_allclose(final, fig.data[1].x, atol=6e-5)


def test_the_script_prints_the_attention_row_and_the_lens_the_page_shows(bundled_ctl, run, tmp_path):
    ctl, state = bundled_ctl, run
    n = len(state["ids"])
    sel = c.Selection(position=n - 3, layer=2, head=4, tab="attention")
    fig = ctl.select(state, SETTINGS, sel).views["row"]
    lines = run_script(ctl, state, sel, tmp_path)
    assert lines[1] == f"layer 2, head 4: what token {n - 3} reads"
    weights = [float(line.split("\t")[2]) for line in lines[2:]]
    assert len(weights) == n - 2 and sum(weights) == pytest.approx(1, abs=1e-5)
    shown = np.array(fig.data[1].z)[4]  # the row figure's heatmap: one row per head, 3 decimals
    np.testing.assert_allclose(weights[-len(shown):], shown, atol=6e-4)

    sel = c.Selection(position=n - 3, tab="lens")
    fig = ctl.select(state, SETTINGS, sel).views["lens"]
    lines = run_script(ctl, state, sel, tmp_path)
    probs = [float(line.split("\t")[2]) for line in lines[2:]]
    start, _ = c.window(n - 3, n, c.WINDOW_LENS)
    shown = np.array(fig.data[0].z, dtype=float)[n - 3 - start, :-1]  # this position's row, every layer (the last column: next)
    np.testing.assert_allclose(probs, shown, atol=6e-4)
    guesses = [line.split("\t")[1] for line in lines[2:]]
    cells = fig.data[0].text[n - 3 - start][:-1]
    from gpt2viz.plots import short

    assert [cell.lstrip("✓") for cell in cells] == [short(eval(g), 6) for g in guesses]  # noqa: S307 - repr of a str the script printed


def test_the_script_of_the_why_view_and_of_an_experiment(bundled_ctl, run, tmp_path):
    from gpt2viz.attribution import attribution

    ctl, state = bundled_ctl, run
    n = len(state["ids"])
    sel = c.Selection(position=n - 1, tab="why")
    lines = run_script(ctl, state, sel, tmp_path)
    session = ctl.sessions.get(state, c.sampling_config(*SETTINGS)).session
    a = attribution(session, n - 2, session.ids[n - 1])
    assert float(lines[1].split()[2]) == pytest.approx(a.logit_diff, abs=1e-5)
    assert [line.split("\t")[0] for line in lines[2:]] == [name for name, _ in a.top(10)]
    page = ctl.experiment(state, "tiny-shakespeare", PROMPT, SETTINGS, c.Selection(), ["head 0.0"], "zero")
    r = ctl.sessions.get(page.state, c.sampling_config(*SETTINGS)).experiment.report
    lines = run_script(ctl, page.state, c.Selection(tab="experiment"), tmp_path)
    before, after = lines[1].removeprefix("loss on the prompt: ").split(" -> ")
    assert (float(before), float(after)) == (pytest.approx(r.prompt_loss_original, abs=1e-5), pytest.approx(r.prompt_loss_intervened, abs=1e-5))
    assert lines[3] == "original: " + repr(r.original_text) and lines[4] == "changed:  " + repr(r.intervened_text)


def test_the_npz_reloads_to_an_independent_traces_arrays(bundled_ctl, run, tmp_path, tokenizer):
    ctl, state = bundled_ctl, run
    page = ctl.download(state, SETTINGS, c.Selection(), "run.npz")
    name, data = page.file
    path = tmp_path / name
    path.write_bytes(data)
    with np.load(path) as z:  # allow_pickle is False by default: plain arrays only
        arrays = {k: z[k] for k in z.files}
    session = ctl.sessions.get(state, c.sampling_config(*SETTINGS)).session
    tr = trace(session.model, tokenizer, session.ids)  # one full pass, computed apart from the session
    np.testing.assert_array_equal(arrays["tokens"], tr.tokens)
    assert list(arrays["token_strings"]) == tr.token_strings
    n_prompt = len(session.prompt_ids)
    assert list(arrays["methods"]) == ["prompt"] * n_prompt + ["sampled", "forced", "sampled", "sampled", "sampled"]
    np.testing.assert_allclose(arrays["attention"], tr.attention, atol=1 / 510 + 1e-3)  # the trace keeps 8-bit attention
    np.testing.assert_allclose(arrays["attention"].sum(-1), 1, atol=3e-3)
    np.testing.assert_allclose(arrays["resid"], tr.resid.astype(np.float32), atol=2e-2, rtol=2e-3)  # the trace's float16
    np.testing.assert_allclose(arrays["logprobs"][1:], tr.logprobs[1:], atol=3e-4)  # token by token against one pass
    np.testing.assert_array_equal(arrays["lens_ids"][:, :, 0], tr.lens_ids[:, :, 0])
    meta = json.loads(str(arrays["meta"]))
    assert meta["model"] == "tiny-shakespeare" and meta["settings"]["seed"] == 3
    assert "attention      [L, H, T, T]" in str(arrays["README"])


def test_the_tables_as_csv(bundled_ctl, run):
    ctl, state = bundled_ctl, run
    session = ctl.sessions.get(state, c.sampling_config(*SETTINGS)).session
    rows = list(csv.DictReader(io.StringIO(ctl.download(state, SETTINGS, c.Selection(), "upcoming.csv").file[1].decode())))
    pred = session.peek()
    assert [int(r["token_id"]) for r in rows] == [cand.token_id for cand in pred.candidates]
    logits = session.capture.logits_at(len(session.ids) - 1)
    probs = torch.softmax(logits.double(), -1)
    for r in rows:
        assert float(r["model_probability"]) == pytest.approx(float(probs[int(r["token_id"])]), rel=1e-4)
    n = len(session.ids)
    lens = list(csv.DictReader(io.StringIO(ctl.download(state, SETTINGS, c.Selection(position=n - 4), "lens.csv").file[1].decode())))
    start, end = c.window(n - 4, n, c.WINDOW_LENS)
    L = session.model.cfg.n_layer
    assert len(lens) == (end - start) * (L + 1)
    tr = trace(session.model, session.tokenizer, session.ids)
    for r in lens:
        p = int(r["position"])
        layer = 0 if r["layer"] == "embeddings" else int(r["layer"].split()[1]) + 1
        assert int(r["guess_id"]) == tr.lens_ids[layer, p, 0]
        assert r["guess_is_next_token"] == ("" if p == n - 1 else str(int(tr.lens_ids[layer, p, 0] == session.ids[p + 1])))


@pytest.mark.parametrize("fmt", ["pdf", "png"])
def test_the_handout_renders_for_the_bundled_model(bundled_ctl, run, fmt):
    page = bundled_ctl.download(run, SETTINGS, c.Selection(position=5, layer=1, head=2, tab="attention"), f"handout.{fmt}", "letter")
    name, data = page.file
    assert name.endswith(f"handout.{fmt}")
    assert data.startswith(b"%PDF") if fmt == "pdf" else data.startswith(b"\x89PNG")
    if fmt == "png":
        from matplotlib.image import imread

        image = imread(io.BytesIO(data))
        assert image.shape[:2] == (round(11.0 * 150), round(8.5 * 150))  # Letter at 150 dpi
        assert image[..., :3].std() > 0.05  # not a blank sheet


def test_the_handout_of_a_gpt2_small_shaped_checkpoint(tokenizer, tmp_path):
    from gpt2viz import GenerationSession
    from gpt2viz.export import handout_data
    from gpt2viz.handout import render

    model = init_weights(GPT2(GPT2Config(n_layer=12, n_head=12, n_embd=768)), seed=2)
    session = GenerationSession(model, tokenizer, "The quick brown fox " * 30, record=True)
    for _ in range(3):
        session.step()
    n = len(session.ids)
    h = handout_data(session, "gpt2-small-shaped", n - 1, 11, 11, "v1.abc", c.window(n - 1, n, 16), c.window(n - 1, n, 8),
                     c.lens_layers(12, 13))
    assert h.attention.shape == (16, 16) and h.lens_probs.shape == (13, 8)
    np.testing.assert_allclose(h.attention.sum(-1)[-1], session.attention_pattern(11, n - 1, n)[11, 0, n - 16:].sum(), atol=1e-6)
    pdf = render(h, "a4", "pdf")
    assert pdf.startswith(b"%PDF") and len(pdf) > 10_000
    (tmp_path / "handout.pdf").write_bytes(pdf)


def test_bad_download_requests_get_a_message(bundled_ctl, run):
    ctl = bundled_ctl
    for args, message in [((run, SETTINGS, c.Selection(), "../../etc/passwd"), "There is no download"),
                          ((run, SETTINGS, c.Selection(), "handout.pdf", "a3"), "A4 or Letter"),
                          ((None, SETTINGS, c.Selection(), "run.npz"), "Nothing to download yet")]:
        page = ctl.download(*args)
        assert page.warning and message in page.status and page.file is None
