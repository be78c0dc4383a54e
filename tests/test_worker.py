"""The engine in a process of its own (the default on the CPU, gpt2viz/worker.py): the same page through the
public API as in one process (`--engine-process off`), streams that stop, one user's session apart from
another's, and a worker that dies replaced, with each text rebuilt from its page's state."""

import time

import pytest
from gradio_client import Client

from conftest import start_app
from gpt2viz import controller as c
from gpt2viz import hardware, worker
from test_app_api import OUT

SETTINGS = dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=6, seed=4)
PROMPT = "ROMEO:\nBut soft, what light"


@pytest.fixture(scope="module")
def one_process_url(tmp_path_factory):
    yield from start_app(tmp_path_factory, ["--engine-process", "off"])


def strip_text(strip):
    return "".join(t["t"] for t in strip["tokens"])


def test_the_page_through_the_worker_is_the_page_in_one_process(one_process_url, app_url):
    alone, split = Client(one_process_url, verbose=False), Client(app_url, verbose=False)
    for client in (alone, split):
        client.predict(model="tiny-shakespeare", prompt=PROMPT, **SETTINGS, api_name="/step")
    a = list(alone.submit(model="tiny-shakespeare", prompt=PROMPT, **SETTINGS, tokens_per_second=0, api_name="/generate"))
    b = list(split.submit(model="tiny-shakespeare", prompt=PROMPT, **SETTINGS, tokens_per_second=0, api_name="/generate"))
    assert strip_text(a[-1][OUT["strip"]]) == strip_text(b[-1][OUT["strip"]]) and a[-1][1] == b[-1][1]  # the same seed, the same text
    view = dict(position=5, layer=1, head=2, tab="attention")
    one = alone.predict(**{k: v for k, v in SETTINGS.items()}, **view, api_name="/inspect")
    two = split.predict(**{k: v for k, v in SETTINGS.items()}, **view, api_name="/inspect")
    assert one[OUT["attention"]]["plot"] == two[OUT["attention"]]["plot"]  # the attention heatmap, drawn in the web process from the worker's recipe


def test_stop_reaches_the_worker_and_users_stay_apart(app_url):
    first, second = Client(app_url, verbose=False), Client(app_url, verbose=False)
    job = first.submit(model="tiny-shakespeare", prompt=PROMPT, **{**SETTINGS, "max_new_tokens": 200}, tokens_per_second=5,
                       api_name="/generate")
    time.sleep(2)
    other = second.predict(model="tiny-shakespeare", prompt="JULIET:\nO Romeo", **SETTINGS, api_name="/step")
    assert strip_text(other[OUT["strip"]]).startswith("JULIET")
    first.predict(api_name="/stop")
    deadline = time.time() + 30
    while not job.done() and time.time() < deadline:
        time.sleep(0.1)
    assert job.done() and len(job.outputs()) < 60  # at 5 tokens a second, stopped after ~2 s
    after = first.predict(model="tiny-shakespeare", prompt=PROMPT, **SETTINGS, api_name="/step")  # the session still works
    assert "was sampled" in after[1]


def test_the_engine_has_its_own_process_on_the_cpu_but_not_on_zero_gpu(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert hardware.engine_process("auto", "cpu") and not hardware.engine_process("auto", "cuda")
    assert hardware.engine_process("on", "cuda") and not hardware.engine_process("off", "cpu")
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")  # `@spaces.GPU` calls must come from the process Spaces started
    assert not hardware.engine_process("auto", "cpu")
    with pytest.raises(hardware.DeviceError, match="not on ZeroGPU"):
        hardware.engine_process("on", "cpu")
    with pytest.raises(hardware.DeviceError, match="auto, on or off"):
        hardware.engine_process("yes", "cpu")


def wait_for_a_new_worker(w: worker.Worker, restarts: int, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while w.restarts < restarts and time.time() < deadline:
        time.sleep(0.1)
    assert w.restarts == restarts, "no new engine process started"


def test_a_worker_that_dies_is_replaced_and_each_text_goes_on_from_its_page():
    """Killed mid-stream (as the kernel kills a process for memory): the stream ends with a message and the
    tokens it had shown; a new worker starts; the next Step replays the text from the page's state and adds
    the token that a controller in this process adds to the same state."""
    settings = [1.0, 0, 1.0, 1.0, 200, 4]
    here = c.Models(default="tiny-shakespeare")
    local = c.Controller(here, c.Sessions(here))
    w = worker.Worker("tiny-shakespeare")
    try:
        ctl = worker.RemoteController(w)
        other = ctl.step(None, "tiny-shakespeare", "JULIET:\nO Romeo", settings, c.Selection())  # another user's text
        pages = ctl.stream(None, "tiny-shakespeare", PROMPT, settings, c.Selection(), 5)
        shown = [next(pages) for _ in range(4)]
        first = w.process
        first.kill()
        rest = list(pages)
        assert rest[-1].warning and "new one is starting" in rest[-1].status
        state = rest[-1].state
        assert len(state["ids"]) >= len(shown[-1].state["ids"]) > state["prompt_len"]  # the tokens it had shown are kept
        wait_for_a_new_worker(w, 1)
        assert w.process.pid != first.pid and not first.is_alive()

        ids = list(state["ids"])
        mine = ctl.step(state, "tiny-shakespeare", PROMPT, settings, c.Selection())
        expected = local.step(dict(state), "tiny-shakespeare", PROMPT, settings, c.Selection())
        assert not mine.warning and mine.state["ids"][: len(ids)] == ids and len(mine.state["ids"]) == len(ids) + 1
        assert mine.state["ids"] == expected.state["ids"] and mine.strip == expected.strip
        again = ctl.step(other.state, "tiny-shakespeare", "JULIET:\nO Romeo", settings, c.Selection())
        assert again.state["ids"][: len(other.state["ids"])] == other.state["ids"]  # the other user's text, rebuilt too
    finally:
        w.close()


def test_a_call_to_a_worker_that_ended_says_so_in_the_page():
    w = worker.Worker("tiny-shakespeare")
    try:
        ctl = worker.RemoteController(w)
        page = ctl.step(None, "tiny-shakespeare", PROMPT, [1.0, 0, 1.0, 1.0, 6, 4], c.Selection())
        w._closing = True  # no new worker: every later call finds this one gone
        w.process.kill()
        w.process.join()
        refused = ctl.step(page.state, "tiny-shakespeare", PROMPT, [1.0, 0, 1.0, 1.0, 6, 4], c.Selection())
        assert refused.warning and refused.state == page.state  # the page keeps its text for the next worker
        assert ctl.share_link(page.state, PROMPT, [1.0, 0, 1.0, 1.0, 6, 4], c.Selection()) == ""
        assert ctl.stop(page.state) is None
    finally:
        w.close()


def test_the_engine_process_does_not_run_the_main_script():
    """Spawn would first run app.py in the worker (Gradio, pandas, plotly: ~120 MB and seconds of start)."""
    from multiprocessing import spawn
    import sys

    main = sys.modules["__main__"]
    before = (getattr(main, "__file__", None), main.__spec__)
    assert {"init_main_from_path", "init_main_from_name"} & set(spawn.get_preparation_data("x"))
    with worker._main_script_hidden():
        assert not {"init_main_from_path", "init_main_from_name"} & set(spawn.get_preparation_data("x"))
    assert (getattr(main, "__file__", None), main.__spec__) == before
