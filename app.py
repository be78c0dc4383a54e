"""gpt2viz: watch GPT-2 write, one token at a time. Layout and wiring only; the use cases are in
gpt2viz.controller.Controller, which returns a `Page` that `render` maps onto the components.

    python app.py                          # gpt2 from the Hub, or the bundled model offline
    python app.py --model tiny-shakespeare # or GPT2VIZ_MODEL=distilgpt2, or a local folder
"""

from __future__ import annotations

import argparse
import atexit
import functools
import inspect
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from gpt2viz import controller as c
from gpt2viz import hardware
from gpt2viz.memory import configure_allocator, freeze_startup_objects

log = logging.getLogger("gpt2viz")

INTRO = """# gpt2viz — watch GPT-2 write, one token at a time
Type a prompt, then press **Step** to add one token or **Generate** to stream many. Every token is drawn
from a probability distribution that you can see and reshape. Click any token to look inside the model there."""

TEXT_CHOSEN = """**How the selected token was chosen.** After reading the tokens before it, the model gives every
token in its vocabulary a probability (grey). Your settings reshape that distribution (blue) and the next token
is drawn from it (▶). For a token of your prompt nothing was drawn: the chart shows what the model *predicted*
there and how high it ranked the token you actually wrote."""

TEXT_ATTENTION = """**Attention** is how each token gathers information from the tokens before it. In the heatmap,
each row is a token reading (the *query*) and each column a token being read (the *key*); darker means more
attention, and each row adds up to 1. A model has several layers, each with several *heads* that look for
different things: the previous token, the first token, or the token after an earlier copy of the current one
(*induction heads*). A token never reads the tokens after it, so the upper-right half is empty."""

TEXT_OVERVIEW = """**Every head at a glance.** First all the heads of the selected layer, over the same tokens as the
Attention tab and drawn like its heatmap; then every head of every layer as a small square. Heads that do a
recognisable job are labelled: *prev* (previous-token), *dup* (duplicate-token), *ind* (induction)."""

TEXT_LENS = """**The logit lens** asks every layer: "if you had to guess the next token now, what would it be?"
Each **row** is a position in the text (the token being read) and each **column** a layer, from the embeddings
to the last block, whose guess is the model's real prediction. The token that actually came next is written at
the right of each row, and ✓ marks the layers whose top guess is already that token."""

TEXT_EMBED = """**Embeddings.** Each token enters the model as a list of numbers (a vector): its *token embedding*
plus a *position embedding* that says where it sits. Every block then adds to this vector, the *residual
stream*: the line shows how long the vector is after each block, and the map draws its path through the
layers on two axes (PCA). Hover a point of the path to see the logit lens's guess for the next token there."""

TEXT_EXPERIMENT = """**Experiment: switch parts of the model off and see what changes.** Choose heads or whole layers,
then **Run**: the text is generated twice from your prompt with your settings, once by the model as it is and once
with those parts switched off. Both runs draw every token with the *same random number*, so where they differ,
it is because of what you switched off, not chance. Below: both texts (the first difference outlined), how far apart
the two models' predictions are at each step, how surprised each is by every token of the original text, and, for
the selected token, both models' probabilities."""

TEXT_WHY = """**Why this token?** Attention shows where a head *looks*; this shows what each part of the model
*wrote*. The model's logit for the selected token, minus its logit for another token (the runner-up unless you
type one), is exactly the sum of the parts below: every head, every MLP, the embeddings. Then the neurons of the
selected layer's MLP, and how the sampler turned the probabilities into this token with one random number."""

STRIP_TEMPLATE = """<div class="strip">{{#if value.tokens.length}}{{#each value.tokens}}<span class="tok {{this.c}} {{this.sel}}" data-pos="{{@index}}" title="{{this.p}}">{{this.t}}</span>{{#if this.br}}<br>{{/if}}{{/each}}{{else}}<span class="strip-empty">The text appears here token by token. Press Step or Generate, or choose an example.</span>{{/if}}</div>"""
STRIP_JS = """element.addEventListener('click', (e) => {
  const t = e.target.closest('[data-pos]');
  if (t) trigger('click', {position: Number(t.dataset.pos)});
});"""
OVERVIEW_JS = """element.addEventListener('click', (e) => {
  const t = e.target.closest('[data-layer]');
  if (t) trigger('click', {layer: Number(t.dataset.layer), head: Number(t.dataset.head)});
});"""

# Static slider ranges that fit every GPT-2 size; each render narrows them to the current text and model.
MAX_POSITIONS, MAX_LAYERS, MAX_HEADS = 1023, 47, 24

CSS = """
#tab { display: none !important; }
.strip { line-height: 1.9; overflow-wrap: anywhere; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 15px; }
.strip .tok { display: inline-block; line-height: 1.5; border: 1px solid #8a949e; border-radius: 4px; padding: 1px 3px; margin: 2px 1px;
  cursor: pointer; white-space: pre; color: #111; }
.strip .tok.sel { outline: 3px solid #1f3f8f; outline-offset: 1px; font-weight: 700; }
.strip .likely, .chip.likely { background: #2e9e5b55; } .strip .plausible, .chip.plausible { background: #9ccc6577; }
.strip .unlikely, .chip.unlikely { background: #f6b44b88; } .strip .surprising, .chip.surprising { background: #e4572e77; }
.strip .first, .chip.first { background: #d9dde3; }
.strip-empty { color: #5b6570; font-family: system-ui, sans-serif; }
#strip_key { font-size: 13px; color: #4a5561; } #strip_key .key { margin-right: 14px; white-space: nowrap; }
#strip_key .chip { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 4px; border: 1px solid #8a949e; }
.explain { font-size: 0.95rem; }
.overview .ov-title { font-weight: 600; font-size: 16px; margin: 4px 0; } .overview .ov-note { font-size: 13px; color: #4a5561; margin-bottom: 6px; }
.ov-grid { display: grid; gap: 3px; align-items: center; }
.ov-col, .ov-row, .ov-corner { font-size: 12px; color: #4a5561; text-align: center; }
.ov-cell { padding: 1px; border: 2px solid transparent; background: none; cursor: pointer; display: flex; flex-direction: column; align-items: center; }
.ov-cell img { width: 100%; max-width: 64px; image-rendering: pixelated; aspect-ratio: 1; }
.ov-cell.ov-sel { border-color: #e8762d; } .ov-badge { font-size: 10px; color: #1f3f8f; min-height: 12px; }
.why-grid { gap: 2px; } .why-cell { font-size: 11px; padding: 3px 0; border: 2px solid transparent; border-radius: 3px; cursor: pointer;
  font-variant-numeric: tabular-nums; } .why-cell.ov-sel { border-color: #e8762d; } .why-mlp { font-weight: 600; }
.why-table { border-collapse: collapse; font-size: 13px; margin: 6px 0; } .why-table td, .why-table th { padding: 2px 6px;
  border-bottom: 1px solid #e5e8ec; text-align: right; font-variant-numeric: tabular-nums; } .why-table td:first-child { text-align: left;
  font-family: ui-monospace, monospace; white-space: pre; } .why-chosen { font-weight: 700; } .why { margin-bottom: 10px; overflow-x: auto; }  /* a wide table scrolls on a phone */
.why-tok { font-family: ui-monospace, monospace; border: 1px solid #c8ced6; border-radius: 3px; padding: 0 2px; white-space: pre; }
.dec-early, .chip.dec-early { background: #3f63d699 !important; } .dec-middle, .chip.dec-middle { background: #9fb1ef99 !important; }
.dec-late, .chip.dec-late { background: #dcb3ec99 !important; } .dec-last, .chip.dec-last { background: #a03cb988 !important; }
#strip_colour { padding: 0 !important; } #strip_colour .wrap { gap: 4px 10px; }
#lens_strip .key { margin-right: 12px; white-space: nowrap; } #lens_strip .chip { display: inline-block; width: 10px; height: 10px;
  border-radius: 50%; margin-right: 4px; border: 1px solid #8a949e; }
.exp-strip { margin: 4px 0; } .exp-label { display: inline-block; min-width: 9em; font-family: system-ui, sans-serif;
  font-size: 13px; color: #4a5561; margin-right: 6px; } .exp-more { color: #5b6570; }
.strip .tok.div { background: #e8762d33; } .strip .tok.div-first { outline: 3px solid #c0392b; outline-offset: 1px; font-weight: 700; }
.exp-div { font-size: 12px; line-height: 2; } .exp-cell { display: inline-block; min-width: 2.6em; text-align: center; border-radius: 3px;
  margin: 1px; } .exp-note, .exp-empty { font-size: 13px; color: #4a5561; }
@media (max-width: 700px) {
  .gradio-container { padding: 4px !important; }
  #intro p { display: none; }
  #intro h1 { font-size: 22px; }
  .js-plotly-plot .modebar-container { display: none !important; }  /* it covers the titles of a phone-wide figure */
  #strip_key_row { flex-direction: column !important; } #strip_key_row > * { width: 100% !important; min-width: 0 !important; }
  #tabs .tab-container button { padding: 4px 1px !important; font-size: 11px !important; }
  #tabs { margin-left: -10px !important; width: calc(100% + 20px) !important; max-width: none !important; }  /* room for every tab on one line */
}
"""

# The link goes to the clipboard where the browser allows it (it is in the box anyway).
COPY_JS = "(url) => { if (url && url.includes('?s=') && navigator.clipboard) navigator.clipboard.writeText(url).catch(() => {}); return []; }"
# Every chart's corner buttons (plotly's modebar): PNG (plotly's own camera) and an SVG button beside it, both
# saving under the chart's title.
SAVE_JS = """() => {
  const slug = (gd) => 'gpt2viz-' + (((gd.layout || {}).title || {}).text || 'chart').toLowerCase()
      .replace(/<[^>]*>/g, '').replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '').slice(0, 60);
  const camera = (bar) => bar.querySelector('.modebar-btn[data-title^="Download plot"]');
  const add = (bar) => {
    if (bar.querySelector('.gv-svg') || !camera(bar) || !window.Plotly) return;
    const gd = bar.closest('.js-plotly-plot');
    bar.addEventListener('mousedown', () => { gd._context.toImageButtonOptions = {format: 'png', filename: slug(gd), scale: 2}; }, true);
    const group = document.createElement('div');
    group.className = 'modebar-group';
    const btn = document.createElement('a');
    btn.className = 'modebar-btn gv-svg'; btn.setAttribute('data-title', 'Download plot as SVG'); btn.textContent = 'SVG';
    btn.setAttribute('role', 'button'); btn.style.cssText = 'font: 600 10px system-ui, sans-serif; color: #506784; padding: 4px 3px;';
    btn.addEventListener('click', (e) => {
      e.preventDefault();
      window.Plotly.downloadImage(gd, {format: 'svg', filename: slug(gd)}).catch(() => {});
    });
    group.appendChild(btn);
    bar.insertBefore(group, bar.firstChild);
  };
  new MutationObserver(() => document.querySelectorAll('.modebar').forEach(add))
    .observe(document.body, {childList: true, subtree: true});
  return [];
}"""
# A narrow screen gets figures with fewer tokens (read once, when the page loads).
COMPACT_JS = "() => window.innerWidth < 700"
# On a phone, Step and Generate bring the buttons to the top of the screen, so the text appears right under them.
SCROLL_JS = "(...args) => { if (window.innerWidth < 700) document.querySelector('#actions').scrollIntoView({block: 'start'}); return args; }"
SETTING_NAMES = list(c.SHARE_SETTINGS)  # one list: the API's parameter names and what a share link holds
PAGES_KEPT = 512  # browser sessions whose page Gradio keeps (`launch_options`): twice the session store's texts

VIEW_NAMES = ["position", "layer", "head", "tab", "per_head_scale", "compact", "lens_mode", "strip_colour"]


def quiet_refusals(component_class) -> None:
    """Make an input component class's refusals (a value out of range, not one of the choices) reach the client
    as the component's own message and the log as one line, not as a traceback per request. Patched on the
    class: Gradio builds a new instance of a component for each session whose properties an event updated."""
    preprocess = component_class.preprocess
    if getattr(preprocess, "quiet", False):
        return

    def refuse_quietly(self, payload):
        try:
            return preprocess(self, payload)
        except Exception as e:  # noqa: BLE001 - every refusal becomes one message
            message = str(getattr(e, "message", None) or f"{self.label or self.elem_id}: that is not a valid value.")
            message = re.sub(r"\S{41,}", lambda m: m.group()[:20] + "…", message)[:300]  # never echo a huge value back
            log.warning("refused input for %s: %s", self.elem_id, message)
            raise gr.Error(message, print_exception=False) from None

    refuse_quietly.quiet = True
    component_class.preprocess = refuse_quietly


for _input in (gr.Slider, gr.Number, gr.Dropdown, gr.Radio):
    quiet_refusals(_input)


class _NoPageCopies(dict):
    """A browser session's copy of the page's configuration, kept empty (`keep_no_page_copies`)."""

    def __setitem__(self, key, value) -> None:
        pass

    def __contains__(self, key) -> bool:
        return True  # so that Gradio never builds a component's configuration only to keep it here

    def __getitem__(self, key) -> dict:
        return {}


PAGE_COPIES_GRADIO = "6.31.0"  # the Gradio whose `SessionState` `keep_no_page_copies` patches (requirements.txt)


def keep_no_page_copies() -> bool:
    """Gradio builds, for every new browser session, a copy of every component's configuration (~25 ms of the
    server's time at its first event: with thirty students pressing Generate at once, the last one's request
    started ~1 s late), rebuilds a component's at each event that updates it, and keeps in it the last value
    of every component an event updated (figures too: ~0.4 MB a session); only its deep links read it back,
    which this page does not offer. Patched on Gradio's `SessionState`, for the Gradio pinned
    (`PAGE_COPIES_GRADIO`), with `only_what_was_returned` (no component built for an output an event leaves out)
    `summary_only_when_monitored` (no monitoring summary computed after each event) and `no_file_walk_for_text` (no
    search for files in a text output's value); True if done."""
    import datetime  # noqa: PLC0415
    from types import SimpleNamespace  # noqa: PLC0415

    from gradio import processing_utils, queueing, state_holder  # noqa: PLC0415

    cls = state_holder.SessionState
    init = cls.__init__
    if getattr(init, "no_page_copies", False):
        return True
    if gr.__version__ != PAGE_COPIES_GRADIO:
        log.warning("gradio %s, not %s: every browser session keeps its own copy of the page", gr.__version__, PAGE_COPIES_GRADIO)
        return False

    def without_page_copies(self, blocks) -> None:
        init(self, SimpleNamespace(default_config=blocks.default_config, blocks={}))  # no block to copy
        self.config_values = _NoPageCopies()

    def set_without_copy(self, key, value) -> None:  # SessionState.__setitem__ without the configuration kept
        block = self.blocks_config.blocks.get(key)
        if block is None:
            # Not one of the page's components: a component Gradio rebuilt for a property update, which its processing
            # stores again under the rebuilt one's own new id at each later event (one more kept a session per Step,
            # whose position slider changes range). Nothing looks it up there.
            return
        if isinstance(block, gr.State):
            self._state_ttl[key] = (block.time_to_live, datetime.datetime.now())
            self.state_data[key] = value
        else:
            self.blocks_config.blocks[key] = value

    without_page_copies.no_page_copies = True
    cls.__init__, cls.__setitem__, cls._update_config = without_page_copies, set_without_copy, lambda self, key: None
    gr.Blocks.postprocess_data = only_what_was_returned(gr.Blocks.postprocess_data)
    queueing.Queue.compute_analytics_summary = summary_only_when_monitored(queueing.Queue.compute_analytics_summary)
    processing_utils.async_move_files_to_cache = no_file_walk_for_text(processing_utils.async_move_files_to_cache)
    return True


TEXT_OUTPUTS = (gr.HTML, gr.Markdown)  # components whose value is text (or the strip's dict): never a file


def no_file_walk_for_text(move_files_to_cache):
    """`processing_utils.async_move_files_to_cache` that hands a text component's value back as it is. Gradio walks
    every output's value twice a message looking for files to cache; for the streamed strip (an HTML component whose
    value lists every token) that walk was a quarter of the event loop's time under a class's streams, time the
    engine's pass waits for the interpreter lock (bench/README.md). An HTML or Markdown value holds no file to move."""

    async def moved(data, block, *args, **kwargs):
        if isinstance(block, TEXT_OUTPUTS):
            return data
        return await move_files_to_cache(data, block, *args, **kwargs)

    moved.__wrapped__ = move_files_to_cache
    return moved


def summary_only_when_monitored(compute_analytics_summary):
    """`Queue.compute_analytics_summary` that computes nothing where monitoring is off (`launch_options`). After every
    event Gradio builds a pandas table of the last 10,000 events' records and their percentiles (3 ms at 300
    records, 11 ms at 10,000: a class's Steps and views add up to a large share of a core), for the monitoring
    page only; with it off nothing reads the summary, so neither it nor more than one record is kept (part of
    `keep_no_page_copies`)."""

    def summary(self, records):
        blocks = getattr(self.server_app, "blocks", None)
        if blocks is not None and blocks.enable_monitoring is False:
            self.ANALYTICS_MAX_EVENTS = 1
            return self.cached_event_analytics_summary
        return compute_analytics_summary(self, records)

    summary.__wrapped__ = compute_analytics_summary
    return summary


def only_what_was_returned(postprocess_data):
    """`Blocks.postprocess_data` that leaves alone the outputs a handler's dict left out. Gradio answers each of them
    with an empty update, for which it builds a new component (~0.5 ms; this page's events list ~35 outputs and
    return a third of them) and keeps it in the browser session: ~40 components, ~130 KB a session, and ~15 ms of
    the server's time an event. Here only the returned outputs go through Gradio's processing; the others are sent
    as the empty update ("no change") they would have become (part of `keep_no_page_copies`)."""
    import copy  # noqa: PLC0415

    from gradio.blocks import Block  # noqa: PLC0415

    async def returned_only(self, block_fn, predictions, state):
        outputs = list(block_fn.outputs)
        if not (isinstance(predictions, dict) and predictions and len(outputs) > 1 and all(isinstance(k, Block) for k in predictions)):
            return await postprocess_data(self, block_fn, predictions, state)
        given = {k._id: v for k, v in predictions.items()}
        picked = [i for i, b in enumerate(outputs) if b._id in given]
        if len(picked) != len(given) or len(picked) == len(outputs):  # an unknown output (Gradio says so), or all of them
            return await postprocess_data(self, block_fn, predictions, state)
        part = copy.copy(block_fn)
        part.outputs = [outputs[i] for i in picked]
        got = await postprocess_data(self, part, {b: given[b._id] for b in part.outputs}, state)
        out: list = [None if b.stateful else {"__type__": "update"} for b in outputs]  # what Gradio sends for them
        for i, value in zip(picked, got):
            out[i] = value
        return out

    returned_only.__wrapped__ = postprocess_data
    return returned_only


keep_no_page_copies()


class RefuseUploads:
    """ASGI middleware: the page has no file input, so Gradio's upload route refuses instead of caching files."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].rstrip("/").endswith("/gradio_api/upload"):
            await send({"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"This app takes no files."})
            return
        await self.app(scope, receive, send)


DOWNLOAD_DIR = Path(tempfile.gettempdir()) / "gpt2viz-downloads"
DOWNLOAD_TTL = 3600  # seconds a prepared download stays on disk (Gradio serves its own copy, cleaned by delete_cache)


def save_download(name: str, data: bytes) -> str:
    """Write a prepared download where Gradio can serve it: a fresh folder per file (the name is the
    controller's, never the user's), and anything older than DOWNLOAD_TTL removed."""
    DOWNLOAD_DIR.mkdir(exist_ok=True)
    now = time.time()
    for old in DOWNLOAD_DIR.iterdir():
        try:
            if now - old.stat().st_mtime > DOWNLOAD_TTL:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    folder = DOWNLOAD_DIR / uuid.uuid4().hex
    folder.mkdir()
    path = folder / name
    path.write_bytes(data)
    return str(path)


def who_of(request: gr.Request | None) -> c.Who:
    """Whose work a request is: the browser session and the client's address (for the engine's caps)."""
    client = getattr(request, "client", None)
    return c.Who(str(getattr(request, "session_hash", "") or ""), str(getattr(client, "host", "") or ""))


def build(models: c.Models, sessions: c.Sessions, ctl: c.Controller | None = None) -> gr.Blocks:
    """The page, wired to `ctl` (default: a Controller over `models` and `sessions` in this process)."""
    ctl = ctl or c.Controller(models, sessions)
    default_prompt = c.example_text(c.DEFAULT_EXAMPLE_BUNDLED if models.default in c.BUNDLED_MODELS else c.DEFAULT_EXAMPLE)
    # The page has no file input; whatever is uploaded to Gradio's cache anyway is deleted within two hours.
    with gr.Blocks(title="gpt2viz", delete_cache=(3600, 3600)) as demo:
        state = gr.State(c.new_state(models.default), time_to_live=6 * 3600,
                         delete_callback=lambda s: sessions.drop((s or {}).get("key")))
        # The open tab (views are drawn for it only): rendered but hidden by CSS, since Gradio does not pass
        # a server's update on to a component built with visible=False.
        tab = gr.Textbox("chosen", elem_id="tab", container=False, show_label=False)
        compact = gr.Checkbox(False, visible=False, elem_id="compact")  # set in the browser when the page loads
        link_shown = gr.Checkbox(False, visible=False, elem_id="link_shown")  # a shared link's page has reached the browser
        gr.Markdown(INTRO, elem_id="intro")
        gr.Markdown(models.notice, visible=bool(models.notice), elem_id="notice")
        with gr.Row(equal_height=True):
            model_name = gr.Dropdown(models.names(), value=models.default, label="Model", elem_id="model", scale=1, min_width=160)
            example = gr.Dropdown(c.examples_for(models.default), value=None, label="Example", elem_id="example", scale=2, min_width=200)
            show_me = gr.Button("Show me", elem_id="show_me", scale=0, min_width=100)
        example_hint = gr.Markdown(elem_classes="explain", elem_id="example_hint")
        prompt = gr.Textbox(label="Prompt", lines=2, max_lines=8, elem_id="prompt", value=default_prompt)
        with gr.Row(elem_id="actions"):
            generate_btn = gr.Button("Generate", variant="primary", elem_id="generate", min_width=90)
            step_btn = gr.Button("Step", elem_id="step", min_width=70)
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", min_width=70)
            reset_btn = gr.Button("Reset", elem_id="reset", min_width=70)
        status = gr.Markdown(elem_id="status")
        with gr.Accordion("Share and download", open=False, elem_id="share"):
            share_btn = gr.Button("Make a link to this page", elem_id="share_btn", size="sm")
            share_url = gr.Textbox(label="Link (copied to the clipboard; it replays the text, settings, experiment and view)",
                                   elem_id="share_url", max_lines=2, buttons=["copy"])
            with gr.Row(equal_height=True):
                download_what = gr.Dropdown([(what, key) for key, what in c.DOWNLOADS.items()], value="handout.pdf",
                                            label="Download", elem_id="download_what", scale=3, min_width=220)
                paper = gr.Radio([("A4", "a4"), ("Letter", "letter")], value="a4", label="Paper (handouts)",
                                 elem_id="paper", scale=1, min_width=150)
            download_btn = gr.Button("Prepare the download", elem_id="download_btn", size="sm")
            download_file = gr.File(label="Your file", elem_id="download_file", interactive=False, height=80)
            gr.Markdown("Every chart on the page can also be saved by itself: hover it and use the camera (PNG) or "
                        "SVG button in its corner.", elem_classes="explain")
        strip = gr.HTML(c.empty_strip(), html_template=STRIP_TEMPLATE, js_on_load=STRIP_JS, elem_id="strip")
        with gr.Row(equal_height=True, elem_id="strip_key_row"):  # on a phone the choice goes under the key
            strip_key = gr.HTML(c.strip_key("prob", 1), elem_id="strip_key")
            strip_colour = gr.Radio([("how likely", "prob"), ("where the model decided", "decided")], value="prob",
                                    label="Colour the text by", elem_id="strip_colour", scale=0, min_width=260)
        with gr.Row(equal_height=True):
            position = gr.Slider(0, MAX_POSITIONS, value=0, step=1, label="Selected token", elem_id="position", scale=1, min_width=200)
            selected_label = gr.Markdown(elem_id="selected_label")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                upcoming = gr.Plot(elem_id="upcoming_plot", show_label=False)
                with gr.Accordion("Sampling controls (they reshape the upcoming token's distribution)", open=True):
                    temperature = gr.Slider(0, 2, value=1.0, step=0.05, label="Temperature (0 = always the likeliest)", elem_id="temperature")
                    top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)", elem_id="top_k")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.01, label="Top-p (1 = off)", elem_id="top_p")
                    penalty = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty (1 = off)", elem_id="penalty")
                    max_new = gr.Slider(1, 200, value=30, step=1, label="Max new tokens", elem_id="max_new")
                    speed = gr.Slider(0, 10, value=5, step=1, label="Speed: tokens per second (0: as fast as it goes)", elem_id="speed",)
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed (same seed, same text)", elem_id="seed")
                with gr.Accordion("Choose the next token yourself", open=True):
                    pick = gr.Dropdown(choices=[], label="The upcoming token's candidates", elem_id="pick")
                    pick_btn = gr.Button("Use this token", elem_id="pick_btn")
                    typed = gr.Textbox(label="...or type a token (' Paris' with its space, or #464 for an id)", elem_id="typed")
                    typed_btn = gr.Button("Use typed token", elem_id="typed_btn")
                with gr.Accordion("Rewind", open=False):
                    rewind_to = gr.Slider(0, MAX_POSITIONS, value=0, step=1, label="Keep this many generated tokens", elem_id="rewind_to")
                    rewind_btn = gr.Button("Rewind", elem_id="rewind_btn")
            with gr.Column(scale=2, min_width=320):
                with gr.Tabs(selected="chosen", elem_id="tabs") as tabs:
                    with gr.Tab("Chosen", id="chosen", elem_id="tab-chosen") as tab_chosen:
                        gr.Markdown(TEXT_CHOSEN, elem_classes="explain")
                        chosen_plot = gr.Plot(elem_id="chosen_plot", show_label=False)
                    with gr.Tab("Attention", id="attention", elem_id="tab-attention") as tab_attention:
                        gr.Markdown(TEXT_ATTENTION, elem_classes="explain")
                        with gr.Row():
                            layer = gr.Slider(0, MAX_LAYERS, value=0, step=1, label="Layer", elem_id="layer", min_width=140)
                            head = gr.Slider(0, MAX_HEADS, value=0, step=1, label="Head", elem_id="head", min_width=140)
                        attn_plot = gr.Plot(elem_id="attn_plot", show_label=False)
                        row_plot = gr.Plot(elem_id="row_plot", show_label=False)
                    with gr.Tab("Heads", id="overview", elem_id="tab-overview") as tab_overview:
                        gr.Markdown(TEXT_OVERVIEW, elem_classes="explain")
                        per_head = gr.Checkbox(False, label="All-heads grid: each head on its own scale (diffuse heads stay visible)", elem_id="per_head")
                        grid_plot = gr.Plot(elem_id="grid_plot", show_label=False)
                        overview = gr.HTML("", js_on_load=OVERVIEW_JS, elem_id="overview")
                    with gr.Tab("Lens", id="lens", elem_id="tab-lens") as tab_lens:
                        gr.Markdown(TEXT_LENS, elem_classes="explain")
                        lens_mode = gr.Radio([("each layer's top guess", "top"), ("rank of the final guess", "rank"),
                                              ("how unsure (entropy)", "entropy")], value="top", label="Show", elem_id="lens_mode")
                        lens_plot = gr.Plot(elem_id="lens_plot", show_label=False)
                        lens_strip = gr.HTML("", elem_id="lens_strip")
                    with gr.Tab("Embeddings", id="embed", elem_id="tab-embed") as tab_embed:
                        gr.Markdown(TEXT_EMBED, elem_classes="explain")
                        emb_plot = gr.Plot(elem_id="emb_plot", show_label=False)
                        norm_plot = gr.Plot(elem_id="norm_plot", show_label=False)
                        traj_plot = gr.Plot(elem_id="traj_plot", show_label=False)
                    with gr.Tab("Why", id="why", elem_id="tab-why") as tab_why:
                        gr.Markdown(TEXT_WHY, elem_classes="explain")
                        versus = gr.Textbox(label="Compare with (a token, e.g. ' are' or #464; empty: the runner-up)",
                                            elem_id="versus", max_lines=1)
                        why_dla = gr.HTML("", js_on_load=OVERVIEW_JS, elem_id="why_dla")
                        why_neurons = gr.HTML("", elem_id="why_neurons")
                        why_sampler = gr.HTML("", elem_id="why_sampler")
                    with gr.Tab("Experiment", id="experiment", elem_id="tab-experiment") as tab_experiment:
                        gr.Markdown(TEXT_EXPERIMENT, elem_classes="explain")
                        targets = gr.Dropdown(c.target_choices(models.get(models.default).cfg), value=[], multiselect=True,
                                              label="Switch off", elem_id="targets")
                        with gr.Row():
                            mode = gr.Radio([("set to zero", "zero"), ("set to their average", "mean")], value="zero",
                                            label="How", elem_id="mode", min_width=200)
                            add_head = gr.Button("Add the selected head", elem_id="add_head", min_width=120)
                            run_exp = gr.Button("Run experiment", variant="primary", elem_id="run_exp", min_width=120)
                        with gr.Accordion("More: MLP neurons, patching from another text", open=False):
                            neurons = gr.Textbox(label="MLP neurons to switch off, as layer: neuron, neuron (e.g. 2: 12, 700)",
                                                 elem_id="neurons", max_lines=1)
                            patch_text = gr.Textbox(label="Patch: the residual stream entering the selected layer (Attention "
                                                    "tab), taken from the model reading this text instead", elem_id="patch_text",
                                                    max_lines=3)
                        lesson = gr.Button("Lesson: switch off the heads that copy (induction heads; on a model without them, its "
                                           "previous-token head)", elem_id="lesson", size="sm")
                        exp_strips = gr.HTML(c.experiment_views(None, 0, None)["exp_strips"], elem_id="exp_strips")
                        exp_loss = gr.Plot(elem_id="exp_loss", show_label=False)
                        exp_bars = gr.Plot(elem_id="exp_bars", show_label=False)

        view_components = {"chosen": chosen_plot, "attention": attn_plot, "row": row_plot, "grid": grid_plot,
                           "overview": overview, "lens": lens_plot, "lens_strip": lens_strip, "embed": emb_plot, "norm": norm_plot, "traj": traj_plot,
                           "exp_strips": exp_strips, "exp_loss": exp_loss, "exp_bars": exp_bars,
                           "why_dla": why_dla, "why_neurons": why_neurons, "why_sampler": why_sampler}
        everything = [state, tab, status, strip, strip_key, lens_mode, strip_colour, versus, position, selected_label, layer, head, rewind_to, upcoming, pick,
                      tabs, prompt, example_hint, example, targets] + list(view_components.values())

        def render(page: c.Page) -> dict:
            """A `Page` as updates of the components it names (the others stay as they are)."""
            if page.warning and page.status:
                gr.Warning(page.status.removeprefix("⚠️ "))
            new_state = dict(page.state or {})
            # a page that leaves the state as it is still names one output: Gradio reads an empty dict as one value
            out: dict = {state: new_state} if page.state is not None else {status: gr.skip()}
            if page.status is not None:
                out[status] = page.status
            if page.strip is not None:
                out[strip] = page.strip
            if page.strip_key is not None:
                out[strip_key] = page.strip_key
            if page.modes and page.selection is not None:
                out[lens_mode], out[strip_colour] = page.selection.lens_mode, page.selection.strip_colour
            if page.versus is not None:
                out[versus] = page.versus
            sel = page.selection
            if sel is not None:
                out[tab] = sel.tab
                # A slider's range is sent only when it changed since the page last drew it (kept in the state):
                # Gradio rebuilds a component for every property update, and a re-render can swallow a click.
                sent = dict(new_state.get("ranges") or {})
                for slider, size, value, echo in ((position, page.n_tokens - 1, sel.position, page.echo),
                                                  (layer, page.n_layer - 1, sel.layer, page.echo),
                                                  (head, page.n_head - 1, sel.head, page.echo),
                                                  (rewind_to, page.n_generated, page.n_generated, True)):
                    name = slider.elem_id
                    if sent.get(name) != size:
                        sent[name] = size
                        out[slider] = gr.update(maximum=max(size, 1), interactive=size > 0, **({"value": value} if echo else {}))
                    elif echo:
                        out[slider] = value
                new_state["ranges"] = sent
            if page.selected_label is not None:
                out[selected_label] = page.selected_label
            if page.upcoming is not None:
                out[upcoming] = page.upcoming
            if page.choices is not None:
                out[pick] = gr.update(choices=page.choices, value=page.choices[0][1] if page.choices else None)
            for name, value in page.views.items():
                out[view_components[name]] = value
            if page.open_tab:
                out[tabs] = gr.Tabs(selected=page.open_tab)
            if page.prompt is not None:
                out[prompt] = page.prompt
            if page.hint is not None:
                out[example_hint] = page.hint
            if page.examples is not None:
                out[example] = gr.update(choices=page.examples, value=None)
            if page.settings is not None:
                for slider, name in zip(settings, SETTING_NAMES):
                    out[slider] = page.settings[name]
            if page.targets is not None:
                out[targets] = gr.update(choices=page.targets, value=page.targets_value or [])
            elif page.targets_value is not None:
                out[targets] = page.targets_value
            return out

        settings = [temperature, top_k, top_p, penalty, max_new, seed]
        view = [position, layer, head, tab, per_head, compact, lens_mode, strip_colour]

        answers = c.ViewOrder()

        def named(*names, event: bool = False, order: str | None = None):
            """Give a handler taking `*args` these parameter names (they name the API's parameters); a last
            parameter receives the request (gr.Request: whose work it is), with `event` one before it the
            browser event's data (gr.EventData). Gradio finds these special arguments by type hint.
            `order`: "view" drops the answer if a newer one of the same page was shown first (c.ViewOrder);
            "text" takes its place in that order but is always shown."""
            def wrap(body):
                if order is None:
                    fn = body
                else:
                    @functools.wraps(body)
                    def fn(*args):
                        session = who_of(args[-1]).owner
                        ticket = answers.ticket(session) if session else 0
                        out = body(*args)
                        return out if not session or answers.may_show(session, ticket, always=order == "text") else gr.skip()
                params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
                special = {"evt": gr.EventData} if event else {}
                special["request"] = gr.Request
                params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=t) for n, t in special.items()]
                fn.__annotations__ = special
                fn.__signature__ = inspect.Signature(params)
                return fn
            return wrap

        def split(args):
            """(settings values, Selection) from the trailing inputs `settings + view`."""
            return list(args[:6]), c.Selection.of(*args[6:6 + len(VIEW_NAMES)])

        def act(use_case, *extra):
            """A handler for inputs `state, model, prompt, *extra, *settings, *view` -> use_case(..., *extra)."""
            @named("state", "model", "prompt", *extra, *SETTING_NAMES, *VIEW_NAMES, order="text")
            def handler(st, name, text, *rest):
                *rest, request = rest
                ctrl, sel = split(rest[len(extra):])
                return render(use_case(st, name, text, ctrl, sel, *rest[: len(extra)], who=who_of(request)))
            return handler

        @named("state", "model", "prompt", "tokens_per_second", *SETTING_NAMES, *VIEW_NAMES)
        def on_generate(st, name, text, rate, *rest):
            *rest, request = rest
            ctrl, sel = split(rest)
            for page in ctl.stream(st, name, text, ctrl, sel, rate, who=who_of(request)):
                yield {**render(page), tab: sel.tab}  # only these outputs: Gradio rebuilds every output a message skips

        @named("state", *SETTING_NAMES, *VIEW_NAMES, order="text")
        def on_generated(st, *rest):
            *rest, request = rest
            ctrl, sel = split(rest)
            sel.position = None
            return render(ctl.select(st, ctrl, sel, who=who_of(request), upcoming=True))

        @named("state", *SETTING_NAMES, *VIEW_NAMES, order="text")
        def on_stop(st, *rest):
            *rest, request = rest
            ctl.stop(st)
            ctrl, sel = split(rest)
            sel.position = None
            page = ctl.select(st, ctrl, sel, who=who_of(request))
            page.status = page.status or "Stopped."
            return render(page)

        @named("state", *SETTING_NAMES, *VIEW_NAMES, order="view")
        def on_select(st, *rest):
            *rest, request = rest
            ctrl, sel = split(rest)
            return render(ctl.select(st, ctrl, sel, from_sliders=True, who=who_of(request)))

        @named("state", *SETTING_NAMES, *VIEW_NAMES, event=True, order="view")
        def on_strip_click(st, *rest):
            *rest, evt, request = rest
            ctrl, sel = split(rest)
            sel.position = c.as_index(getattr(evt, "position", None))
            return render(ctl.select(st, ctrl, sel, who=who_of(request)))

        @named("state", *SETTING_NAMES, *VIEW_NAMES, event=True, order="view")
        def on_overview_click(st, *rest):
            *rest, evt, request = rest
            ctrl, sel = split(rest)
            sel.layer, sel.head = c.as_index(getattr(evt, "layer", None)) or 0, c.as_index(getattr(evt, "head", None)) or 0
            sel.tab = "attention"
            page = ctl.select(st, ctrl, sel, who=who_of(request))
            page.open_tab = "attention" if not page.warning else None
            return render(page)

        def on_tab(tab_id):
            @named("state", "link_shown", *SETTING_NAMES, *VIEW_NAMES, order="view")
            def handler(st, shown, *rest):
                *rest, request = rest
                if c.sent_before_link(st, shown):  # the select of the page's mount, run after a link opened
                    return {tab: gr.skip()}
                ctrl, sel = split(rest)
                sel.tab = tab_id
                return {**render(ctl.select(st, ctrl, sel, who=who_of(request))), tab: tab_id}  # remembered even before there is a text
            return handler

        @named("state", *SETTING_NAMES, order="view")
        def on_upcoming(st, *ctrl):
            *ctrl, request = ctrl
            return render(ctl.upcoming(st, list(ctrl), who=who_of(request)))

        def on_example(show: bool):
            @named("state", "model", "example", *SETTING_NAMES, *VIEW_NAMES, order="text")
            def handler(st, name, ex, *rest):
                *rest, request = rest
                ctrl, sel = split(rest)
                return render(ctl.choose_example(st, name, ex, ctrl, sel, show_me=show, who=who_of(request)))
            return handler

        @named("state", "model", "prompt", "targets", "mode", "neurons", "patch_text", *SETTING_NAMES, *VIEW_NAMES, order="text")
        def on_experiment(st, name, text, chosen, how, cells, source, *rest):
            *rest, request = rest
            ctrl, sel = split(rest)
            return render(ctl.experiment(st, name, text, ctrl, sel, chosen, how, cells, source, who=who_of(request)))

        @named("state", *SETTING_NAMES, *VIEW_NAMES, event=True, order="view")
        def on_why_click(st, *rest):
            *rest, evt, request = rest
            ctrl, sel = split(rest)
            sel.layer = c.as_index(getattr(evt, "layer", None)) or 0
            head = c.as_index(getattr(evt, "head", None))
            if head is None:  # an MLP: its neurons, in this tab
                sel.tab = "why"
                return render(ctl.select(st, ctrl, sel, who=who_of(request)))
            sel.head, sel.tab = head, "attention"
            page = ctl.select(st, ctrl, sel, who=who_of(request))
            page.open_tab = "attention" if not page.warning else None
            return render(page)

        @named("state", "versus", *SETTING_NAMES, *VIEW_NAMES, order="text")
        def on_versus(st, typed, *rest):
            *rest, request = rest
            ctrl, sel = split(rest)
            return render(ctl.compare_with(st, ctrl, sel, typed, who=who_of(request)))

        @named("state", "model", *SETTING_NAMES, *VIEW_NAMES, order="text")
        def on_lesson(st, name, *rest):
            *rest, request = rest
            ctrl, sel = split(rest)
            return render(ctl.induction_lesson(st, name, ctrl, sel, who=who_of(request)))

        @named("state", "prompt", *SETTING_NAMES, *VIEW_NAMES)
        def on_share(st, text, *rest):
            *rest, request = rest
            ctrl, sel = split(rest)
            link = ctl.share_link(st, text, ctrl, sel)
            if not link:
                return gr.update(value="Press Step or Generate first: there is no text to share yet.")
            base = str(request.headers.get("origin") or "") if request else ""
            return f"{base}/?s={link}" if base else f"?s={link}"

        @named("state", "what", "paper", *SETTING_NAMES, *VIEW_NAMES)
        def on_download(st, what, paper_size, *rest):
            *rest, request = rest
            ctrl, sel = split(rest)
            base = str(request.headers.get("origin") or "") if request else ""
            page = ctl.download(st, ctrl, sel, what, paper_size, base=base, who=who_of(request))
            out = render(page)
            out[download_file] = save_download(*page.file) if page.file else None
            return out

        def on_load(st, request: gr.Request):
            link = (getattr(request, "query_params", None) or {}).get("s")
            if not link:
                return {state: st}
            return {**render(ctl.open_link(st, link, who=who_of(request))), link_shown: True}

        def on_add_head(chosen, model_choice, layer_value, head_value):
            return c.add_head(chosen, models, model_choice, layer_value, head_value)

        # --- wiring -------------------------------------------------------------------------------
        private = dict(api_visibility="private")
        gen_event = gr.on([generate_btn.click, prompt.submit], on_generate, [state, model_name, prompt, speed] + settings + view,
                          [state, tab, status, strip], api_name="generate", js=SCROLL_JS)
        gen_event.then(on_generated, [state] + settings + view, everything, **private)
        text_inputs = [state, model_name, prompt] + settings + view
        step_btn.click(act(ctl.step), text_inputs, everything, api_name="step", js=SCROLL_JS)
        reset_btn.click(act(ctl.reset), text_inputs, everything, api_name="reset")
        stop_btn.click(on_stop, [state] + settings + view, everything, cancels=[gen_event], api_name="stop")
        pick_btn.click(act(ctl.force, "token_id"), [state, model_name, prompt, pick] + settings + view, everything, api_name="force_candidate")
        gr.on([typed_btn.click, typed.submit], act(ctl.force_text, "token_text"), [state, model_name, prompt, typed] + settings + view,
              everything, api_name="force_text")
        rewind_btn.click(act(ctl.rewind, "keep"), [state, model_name, prompt, rewind_to] + settings + view, everything, api_name="rewind")

        select_inputs = [state] + settings + view
        gr.on([position.release, position.input, layer.release, layer.input, head.release, head.input, per_head.input],
              on_select, select_inputs, everything, api_name="inspect", trigger_mode="always_last")
        lens_mode.input(on_select, select_inputs, everything, **private)
        strip_colour.input(on_select, select_inputs, everything, **private)
        strip.click(on_strip_click, select_inputs, everything, **private)
        overview.click(on_overview_click, select_inputs, everything, **private)
        for tab_id, t in (("chosen", tab_chosen), ("attention", tab_attention), ("overview", tab_overview),
                          ("lens", tab_lens), ("embed", tab_embed), ("why", tab_why), ("experiment", tab_experiment)):
            # The browser knows the open tab at once (a Step right after the click must draw it), then the server draws it.
            t.select(None, None, tab, js=f"() => '{tab_id}'", **private)
            t.select(on_tab(tab_id), [state, link_shown] + settings + view, everything, **private)
        gr.on([temperature.input, top_k.input, top_p.input, penalty.input, temperature.release, top_k.release,
               top_p.release, penalty.release], on_upcoming, [state] + settings, everything, api_name="upcoming",
              trigger_mode="always_last")
        example.select(on_example(False), [state, model_name, example] + settings + view, everything, **private)
        show_me.click(on_example(True), [state, model_name, example] + settings + view, everything, api_name="show_me")
        why_dla.click(on_why_click, select_inputs, everything, **private)
        versus.submit(on_versus, [state, versus] + settings + view, everything, api_name="compare_with")
        run_exp.click(on_experiment, [state, model_name, prompt, targets, mode, neurons, patch_text] + settings + view, everything,
                      api_name="experiment")
        lesson.click(on_lesson, [state, model_name] + settings + view, everything, api_name="induction_lesson")
        add_head.click(on_add_head, [targets, model_name, layer, head], targets, **private)
        model_name.select(act(ctl.switch_model), [state, model_name, prompt] + settings + view, everything, api_name="set_model")
        demo.load(None, None, compact, js=COMPACT_JS, **private)
        demo.load(None, None, None, js=SAVE_JS, **private)
        demo.load(on_load, [state], everything + settings + [link_shown], **private)  # a link also sets the sampling controls
        download_btn.click(on_download, [state, download_what, paper] + settings + view, [state, status, download_file],
                           api_name="download")
        share_btn.click(on_share, [state, prompt] + settings + view, share_url, api_name="share_link").then(
            None, [share_url], None, js=COPY_JS, **private)
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description="gpt2viz web app")
    parser.add_argument("--model", default=os.environ.get("GPT2VIZ_MODEL"), help="model name or checkpoint folder")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--device", default=os.environ.get("GPT2VIZ_DEVICE", "auto"), choices=hardware.DEVICES,
                        help="where the models run (auto: a CUDA GPU when there is one; on ZeroGPU see gpt2viz/hardware.py)")
    parser.add_argument("--dtype", default=os.environ.get("GPT2VIZ_DTYPE", "float32"), choices=list(hardware.DTYPES),
                        help="the weights' dtype on a GPU (the CPU always runs float32)")
    parser.add_argument("--engine-process", nargs="?", const="on", choices=["auto", "on", "off"],
                        default=os.environ.get("GPT2VIZ_ENGINE_PROCESS", "auto"),
                        help="run the models, sessions and engine in a process of their own (gpt2viz/worker.py); "
                             "auto: on the CPU, except on ZeroGPU, whose GPU calls are made from the web process")
    args = parser.parse_args()
    try:
        device = hardware.choose_device(args.device)
        dtype = hardware.choose_dtype(args.dtype, device)
        in_own_process = hardware.engine_process(args.engine_process, device)
    except hardware.DeviceError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO)
    configure_allocator()  # before the server's threads start (gpt2viz/memory.py)
    started = time.time()
    if in_own_process:
        from gpt2viz import worker  # noqa: PLC0415
        from gpt2viz.tokenizer import load_tokenizer  # noqa: PLC0415

        engine = worker.Worker(args.model, device, args.dtype)
        atexit.register(engine.close)  # before multiprocessing's own exit hook ends it, so that no new one starts
        models = worker.RemoteModels(engine, load_tokenizer())
        demo = build(models, worker.RemoteSessions(engine), worker.RemoteController(engine))
    else:
        models = c.Models(default=args.model, device=device, dtype=dtype)
        sessions = c.Sessions(models)
        sessions.warm()  # the memory a first class's pass works in (gpt2viz/controller.py, `Sessions.warm`)
        demo = build(models, sessions)
    log.info("model %s ready on %s in %.1fs%s", models.default, device, time.time() - started,
             " (the engine in a process of its own)" if in_own_process else "")
    hardware.release_openmp_workers()  # this thread has loaded the model; the engine's runs it (gpt2viz/hardware.py)
    # Handlers only wait on the engine's loop (gpt2viz/engine.py), which decides who computes, batches
    # everyone's tokens and caps each client's queued work: Gradio's limits only bound waiting threads.
    demo.queue(max_size=1024, default_concurrency_limit=128)
    log.info("%d startup objects frozen (gpt2viz/memory.py)", freeze_startup_objects())
    demo.launch(server_name=args.host, server_port=args.port, **launch_options())


def launch_options(pages: int = PAGES_KEPT) -> dict:
    """`Blocks.launch` settings. Gradio keeps, for every browser session it has seen, a copy of the page's
    configuration and of each component an event updated (~0.4 MB for this page after a Step and three
    views), until 10,000 sessions by default, so memory only grew: it keeps the `pages` most recently used (a page
    dropped from it starts afresh, as a text dropped from the session store is rebuilt from its state)."""
    return dict(css=CSS, theme=gr.themes.Soft(), max_threads=256, app_kwargs={"middleware": [Middleware(RefuseUploads)]},
                max_file_size="1mb", enable_monitoring=False, show_error=False, footer_links=["api"],
                state_session_capacity=pages)


if __name__ == "__main__":
    main()
