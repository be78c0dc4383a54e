"""Every public endpoint of the running app through gradio_client: normal use, streaming,
cancellation, and bad input that must come back as a message, never a crash."""

import threading
import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

MODEL = "tiny-shakespeare"
PROMPT = "ROMEO:\nBut soft, what light"
DEFAULTS = dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=5, seed=0)
# The outputs every endpoint returns, in order (the page's components, less its per-user state).
OUT = {name: i for i, name in enumerate(
    "tab status strip strip_key lens_mode strip_colour versus position selected_label layer head rewind_to upcoming pick prompt hint example targets "
    "chosen attention row grid overview lens lens_strip embed norm traj exp_strips exp_loss exp_bars why_dla why_neurons why_sampler".split())}


def args(prompt=PROMPT, model=MODEL, **overrides):
    return dict(model=model, prompt=prompt, **{**DEFAULTS, **overrides})


def settings(**overrides):
    return {**DEFAULTS, **overrides}


def tokens(strip):
    return [t["t"] for t in strip["tokens"]]


def text(strip):
    """The text of the token strip (tokens are shown with · for spaces and ↵ for newlines)."""
    return "".join(tokens(strip)).replace("↵", "\n").replace("·", " ")


@pytest.fixture
def client(app_url):
    return Client(app_url, verbose=False)


def test_endpoints_are_the_documented_ones(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert names == {"/generate", "/step", "/reset", "/stop", "/force_candidate", "/force_text", "/rewind", "/inspect",
                     "/set_model", "/upcoming", "/show_me", "/experiment", "/induction_lesson", "/compare_with", "/share_link",
                     "/download"}


def test_downloads_come_as_files_and_a_bad_request_as_a_message(client):
    import numpy as np

    client.predict(**args(), api_name="/step")
    status, path = client.predict(**settings(), what="run.npz", paper="a4", position=2, layer=0, head=0, tab="chosen",
                                  api_name="/download")
    assert "Ready" in status and path.endswith("gpt2viz-tiny-shakespeare-run.npz")
    with np.load(path) as z:
        assert z["attention"].shape[:2] == (4, 6) and z["tokens"].shape == (len(z["token_strings"]),)
    status, path = client.predict(**settings(), what="reproduce.py", paper="a4", api_name="/download")
    assert path.endswith(".py") and "load_model('tiny-shakespeare')" in open(path).read()
    status, path = client.predict(**settings(), what="handout.png", paper="letter", api_name="/download")
    assert open(path, "rb").read(4) == b"\x89PNG"
    with pytest.raises(AppError, match="is not in the list of choices"):  # a clear refusal, no traceback
        client.predict(**settings(), what="/etc/passwd", paper="a4", api_name="/download")


def test_a_view_asked_for_before_there_is_a_text_changes_nothing(app_url):
    """As the browser does when the page mounts (its open tab's select): answered, and nothing on the page changes."""
    fresh = Client(app_url, verbose=False)
    views = fresh.predict(**settings(), position=0, layer=0, head=0, tab="attention", api_name="/inspect")
    assert len(views) == len(OUT) and all(v == {"__type__": "update"} for v in views)  # "no change", every output
    after = fresh.predict(**args(), api_name="/step")  # the session still starts a text
    assert "was sampled" in after[OUT["status"]]


def test_generate_streams_one_token_at_a_time(client):
    """Streaming sends the text and the status only (tab, status, strip); the views are drawn after it."""
    job = client.submit(**args(max_new_tokens=6), tokens_per_second=0, api_name="/generate")
    updates = list(job)
    assert all(len(u) == 3 for u in updates)
    strips = [u[OUT["strip"]] for u in updates if isinstance(u[OUT["strip"]], dict) and "tokens" in u[OUT["strip"]]]
    n_prompt = len(tokens(strips[0])) - 1
    assert [len(tokens(s)) for s in strips] == list(range(n_prompt + 1, n_prompt + 7))
    last = updates[-1]
    assert text(last[OUT["strip"]]).startswith(PROMPT)
    assert "was sampled" in last[OUT["status"]]
    views = client.predict(**settings(), position=999, layer=0, head=0, tab="chosen", api_name="/inspect")  # clamped: the newest
    assert views[OUT["chosen"]]["type"] == "plotly" and f"How token {n_prompt + 5}" in views[OUT["chosen"]]["plot"]


def test_step_adds_exactly_one_token_and_continues_the_text(client):
    first = client.predict(**args(), api_name="/step")
    second = client.predict(**args(), api_name="/step")
    assert len(tokens(second[OUT["strip"]])) == len(tokens(first[OUT["strip"]])) + 1
    assert tokens(second[OUT["strip"]])[:-1] == tokens(first[OUT["strip"]])


def test_same_seed_same_text_and_reset(client):
    a = list(client.submit(**args(max_new_tokens=8, seed=11), tokens_per_second=0, api_name="/generate"))[-1][OUT["strip"]]
    reset = client.predict(**args(seed=11), api_name="/reset")
    assert "Back to the prompt" in reset[OUT["status"]]
    b = list(client.submit(**args(max_new_tokens=8, seed=11), tokens_per_second=0, api_name="/generate"))[-1][OUT["strip"]]
    assert tokens(a) == tokens(b)


def test_forcing_a_candidate_and_a_typed_token(client):
    client.predict(**args(), api_name="/step")
    forced = client.predict(**args(), token_id=262, api_name="/force_candidate")  # 262 = " the"
    assert tokens(forced[OUT["strip"]])[-1] == "·the" and "chosen by you" in forced[OUT["status"]]
    typed = client.predict(**args(), token_text=" Juliet", api_name="/force_text")
    assert tokens(typed[OUT["strip"]])[-1] == "·Juliet"
    by_id = client.predict(**args(), token_text="#11", api_name="/force_text")
    assert tokens(by_id[OUT["strip"]])[-1] == ","


def test_rewind_to_an_earlier_token(client):
    gen = list(client.submit(**args(max_new_tokens=6, seed=3), tokens_per_second=0, api_name="/generate"))[-1][OUT["strip"]]
    back = client.predict(**args(), keep=2, api_name="/rewind")
    assert tokens(back[OUT["strip"]]) == tokens(gen)[: len(tokens(gen)) - 4]
    assert "Rewound to 2 generated tokens" in back[OUT["status"]]


def test_inspect_draws_the_visible_views(client):
    client.predict(**args(), api_name="/step")
    out = client.predict(**settings(), position=3, layer=1, head=2, tab="attention", api_name="/inspect")
    assert "Layer 1, head 2" in out[OUT["attention"]]["plot"]
    assert "What token 3" in out[OUT["row"]]["plot"]
    heads = client.predict(**settings(), position=3, layer=1, head=2, tab="overview", api_name="/inspect")
    assert "All 6 heads of layer 1" in heads[OUT["grid"]]["plot"] and 'data-layer="1"' in heads[OUT["overview"]]
    assert out[OUT["strip"]]["selected"] == 3
    lens = client.predict(**settings(), position=3, layer=1, head=2, tab="lens", api_name="/inspect")
    assert "Logit lens" in lens[OUT["lens"]]["plot"] and "plot" not in lens[OUT["attention"]]  # only the visible tab


def test_upcoming_follows_the_controls(client):
    client.predict(**args(), api_name="/step")
    hot = client.predict(**{**settings(), "temperature": 1.8}, api_name="/upcoming")
    cold = client.predict(**{**settings(), "temperature": 0.2}, api_name="/upcoming")
    assert "temperature 1.8" in hot[OUT["upcoming"]]["plot"] and "temperature 0.2" in cold[OUT["upcoming"]]["plot"]
    assert "tokens" not in hot[OUT["strip"]]  # no token added: the strip is left as it is


def test_stop_cancels_a_running_generation(client, app_url):
    job = client.submit(**args(max_new_tokens=200), tokens_per_second=0, api_name="/generate")
    while len(job.outputs()) < 3:
        time.sleep(0.05)
    client.predict(api_name="/stop")
    deadline = time.time() + 30
    while not job.done() and time.time() < deadline:
        time.sleep(0.1)
    assert job.done()
    assert len(job.outputs()) < 150
    after = client.predict(**args(), api_name="/step")  # the session still works
    assert "was sampled" in after[OUT["status"]]


def test_client_side_cancel_also_stops(client):
    job = client.submit(**args(max_new_tokens=200), tokens_per_second=0, api_name="/generate")
    while len(job.outputs()) < 2:
        time.sleep(0.05)
    job.cancel()
    time.sleep(1.0)
    n = len(job.outputs())
    assert n < 150


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c: c.predict(**args(prompt=""), api_name="/step"), "prompt is empty"),
        (lambda c: c.predict(**args(prompt="   \n "), tokens_per_second=0, api_name="/generate"), "prompt is empty"),
        (lambda c: c.predict(**args(prompt=" thou" * 300), api_name="/step"), "can only read 256 tokens"),
        (lambda c: c.predict(**args(prompt="x" * 30000), api_name="/step"), "prompt is too long"),
        (lambda c: c.predict(**args(), token_text=" no such token here", api_name="/force_text"), "not a single token"),
        (lambda c: c.predict(**args(), token_text="#123456", api_name="/force_text"), "There is no token #123456"),
        (lambda c: c.predict(**args(), token_text="#²", api_name="/force_text"), "not a token id"),
        (lambda c: c.predict(**args(), keep=999, api_name="/rewind"), "Can rewind to between 0 and"),
        (lambda c: c.predict(**args(), token_id=None, api_name="/force_candidate"), "Pick one of the candidates"),
    ],
    ids=["empty", "blank", "over-context", "over-length", "multi-token", "no-such-id", "odd-digit", "rewind-range", "no-pick"],
)
def test_bad_input_gets_a_friendly_message(client, call, message):
    out = call(client)
    status = out[OUT["status"]]
    assert message in status and status.startswith("⚠️")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(temperature=5.0), "greater than maximum"),
        (dict(top_p=0.0), "less than minimum"),
        (dict(seed=-4), "less than minimum"),
        (dict(max_new_tokens=10_000), "greater than maximum"),
    ],
)
def test_out_of_range_values_are_refused_with_a_reason(client, overrides, message):
    with pytest.raises(AppError, match=message):
        client.predict(**args(**overrides), api_name="/step")


@pytest.mark.parametrize("token_id", ["²", "9" * 5000, "12abc"], ids=["superscript", "5000-digits", "letters"])
def test_a_bad_candidate_id_is_refused_with_a_short_message(client, token_id):
    with pytest.raises(AppError) as refused:
        client.predict(**args(), token_id=token_id, api_name="/force_candidate")
    assert "not in the list of choices" in str(refused.value) and len(str(refused.value)) < 200


def test_a_position_past_the_text_is_refused_once_the_slider_knows_the_text(client):
    client.predict(**args(), api_name="/step")  # the page's position slider now ends at the last token
    with pytest.raises(AppError, match="greater than maximum value"):
        client.predict(**settings(), position=999, layer=0, head=0, tab="chosen", api_name="/inspect")


def test_a_value_of_the_wrong_type_is_refused_in_words(client):
    with pytest.raises(AppError, match="Keep this many generated tokens: that is not a valid value"):
        client.predict(**args(), keep="abc", api_name="/rewind")


def test_uploads_are_refused(app_url):
    """The page has no file input: nothing sent to Gradio's upload route is stored."""
    import urllib.error
    import urllib.request

    body = b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.txt"\r\n\r\nhello\r\n--x--\r\n'
    request = urllib.request.Request(app_url + "gradio_api/upload", data=body,
                                     headers={"Content-Type": "multipart/form-data; boundary=x"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403


def test_unknown_model_is_refused(client):
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict(**args(model="../../etc/passwd"), api_name="/set_model")


def test_users_do_not_see_each_other(app_url):
    alice, bob = Client(app_url, verbose=False), Client(app_url, verbose=False)
    a = alice.predict(**args(prompt="ROMEO:\nO"), api_name="/step")
    b_results = []
    thread = threading.Thread(target=lambda: b_results.append(list(bob.submit(
        **args(prompt="JULIET:\nAy", max_new_tokens=4), tokens_per_second=0, api_name="/generate"))))
    thread.start()
    a2 = alice.predict(**args(prompt="ROMEO:\nO"), api_name="/step")
    thread.join(60)
    s = OUT["strip"]
    assert text(a2[s]).startswith("ROMEO:\nO") and len(tokens(a2[s])) == len(tokens(a[s])) + 1
    assert text(b_results[0][-1][s]).startswith("JULIET:\nAy")
    assert "ROMEO" not in text(b_results[0][-1][s])


def test_an_experiment_through_the_api_and_targets_it_refuses(client):
    out = client.predict(**args(max_new_tokens=6), targets=["head 0.0", "MLP 1"], mode="zero", neurons="", patch_text="", position=999, layer=0, head=0,
                         tab="experiment", api_name="/experiment")
    assert "Switched off: head 0.0, MLP 1 set to zero" in out[OUT["status"]]
    assert out[OUT["exp_strips"]].count('class="strip exp-strip"') == 2
    assert "Surprise at each token" in out[OUT["exp_loss"]]["plot"]
    out = client.predict(**args(), targets=[], mode="zero", neurons="", patch_text="", position=0, layer=0, head=0, tab="experiment", api_name="/experiment")
    assert "Choose what to switch off first" in out[OUT["status"]]
    for targets, mode in ((["head 0.9"], "zero"), (["__import__('os').system('ls')"], "zero"), (["head 0.0"], "half")):
        with pytest.raises(AppError, match="not in the list of choices"):
            client.predict(**args(), targets=targets, mode=mode, neurons="", patch_text="", position=0, layer=0, head=0, tab="experiment", api_name="/experiment")


def test_server_survives_everything_above(client):
    out = client.predict(**args(), api_name="/step")
    assert "was sampled" in out[OUT["status"]]


def test_a_local_model_path_is_never_published(deep_app_url, tmp_path_factory):
    import urllib.request

    shape, url = deep_app_url
    config = urllib.request.urlopen(url + "config", timeout=10).read().decode()
    info = urllib.request.urlopen(url + "gradio_api/info", timeout=10).read().decode()
    assert f"local: deep-{shape}" in config  # the folder's name is shown...
    base = str(tmp_path_factory.getbasetemp())
    assert base not in config and base not in info  # ...never where it is


def test_gradio_keeps_the_pages_of_a_bounded_number_of_browser_sessions():
    """Gradio keeps a copy of the page for every browser session it has seen (10,000 by default): the app's
    launch settings bound it, so a day of visitors does not grow the server's memory without end."""
    import app
    from conftest import free_port
    from gpt2viz import controller as c

    models = c.Models()
    demo = app.build(models, c.Sessions(models))
    demo.queue()
    _, url, _ = demo.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True, **app.launch_options(pages=4))
    try:
        client = Client(url, verbose=False)
        for i in range(9):
            client.reset_session()  # a new browser session each time
            client.predict(**args(seed=i), api_name="/step")
        assert 0 < len(demo.state_holder.session_data) <= 4
    finally:
        demo.close()


def test_gradio_does_not_search_a_text_outputs_value_for_files(monkeypatch):
    """Gradio walks every output's value twice a streamed message looking for files (`app.no_file_walk_for_text`):
    for the strip, a quarter of the event loop's time under thirty streams. An HTML or Markdown value comes back
    as it is, without the walk; another component's value (JSON here) is still walked."""
    import asyncio

    import app
    import gradio as gr
    from gradio import processing_utils
    from gradio_client import utils as client_utils

    assert app.keep_no_page_copies()
    walks = []
    traverse = client_utils.async_traverse
    monkeypatch.setattr(client_utils, "async_traverse", lambda *a, **k: walks.append(a[0]) or traverse(*a, **k))
    strip = {"tokens": [{"text": "a", "id": 64}] * 50, "selected": 3}
    for block in (gr.HTML(), gr.Markdown()):
        got = asyncio.run(processing_utils.async_move_files_to_cache(strip, block, postprocess=True))
        assert got is strip and walks == []
    asyncio.run(processing_utils.async_move_files_to_cache({"x": [1, 2]}, gr.JSON(), postprocess=True))
    assert walks[:1] == [{"x": [1, 2]}]  # (and its parts, recursively)


def test_a_new_browser_session_costs_gradio_no_copy_of_the_page():
    """Gradio would build every component's configuration for each new browser session and keep in it the last
    value of every component an event updated (`app.keep_no_page_copies`): thirty students pressing Generate at
    once waited ~1 s for it. A session's events build none, and the session keeps none. Nor does Gradio build a
    new component for each output an event leaves out (`app.only_what_was_returned`): only for the few whose
    properties the event changes (the sliders' ranges, the candidates' choices). Nor, with monitoring off, does
    Gradio tabulate its event records after every event (`app.summary_only_when_monitored`)."""
    import app
    from conftest import free_port
    from gradio import blocks, queueing
    from gpt2viz import controller as c

    assert app.keep_no_page_copies()
    models = c.Models()
    demo = app.build(models, c.Sessions(models))
    demo.queue()
    _, url, _ = demo.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True, **app.launch_options())
    built, components, tables = [], [], []
    config_for_block = blocks.BlocksConfig.config_for_block
    block_init = blocks.Block.__init__
    get_df = queueing.Queue._get_df
    queueing.Queue._get_df = staticmethod(lambda records: tables.append(len(records)) or get_df(records))
    blocks.BlocksConfig.config_for_block = staticmethod(lambda *a, **k: built.append(a[0]) or config_for_block(*a, **k))
    blocks.Block.__init__ = lambda self, *a, **k: components.append(type(self).__name__) or block_init(self, *a, **k)
    try:
        client = Client(url, verbose=False)
        for i in range(3):
            client.reset_session()  # a new browser session each time
            out = client.predict(**args(seed=i), api_name="/step")
            assert len(out[OUT["strip"]]["tokens"]) > 3  # the page works
            out = client.predict(**settings(), position=2, layer=1, head=0, tab="attention", api_name="/inspect")
            assert "attention" in out[OUT["attention"]]["plot"]  # the view is drawn
        kept = [list(s.config_values.items()) for s in demo.state_holder.session_data.values()]
        session = next(reversed(demo.state_holder.session_data.values()))
        page = len(session.blocks_config.blocks)
        for _ in range(4):  # each Step changes the position slider's range: Gradio rebuilds it, and kept each rebuilt one
            client.predict(**args(seed=3), api_name="/step")
        extra = set(session.blocks_config.blocks) - set(demo.default_config.blocks)
    finally:
        blocks.BlocksConfig.config_for_block = staticmethod(config_for_block)
        blocks.Block.__init__ = block_init
        queueing.Queue._get_df = staticmethod(get_df)
        demo.close()
    n_components = len(demo.blocks)
    assert len(built) < n_components / 4, f"built {len(built)} component configurations for 3 sessions of a page of {n_components}"
    assert len(kept) == 3 and kept == [[], [], []]
    # Each session's Step changes the ranges of four sliders and the candidates' choices; its view changes none.
    assert len(components) <= 3 * 6 + 4 * 3, f"Gradio built {len(components)} components for 10 events of 3 sessions: {components}"
    assert not extra and len(session.blocks_config.blocks) == page, f"a session keeps {len(extra)} components that are not the page's"
    assert tables == [] and len(demo._queue.event_analytics) <= 1, f"Gradio tabulated its event records {len(tables)} times"
