"""The engine in a process of its own (`app.py --engine-process`, gpt2viz/worker.py): the same page through the
public API, streams that stop, one user's session apart from another's, and the worker gone quietly with the app."""

import time

import pytest
from gradio_client import Client

from conftest import start_app
from test_app_api import OUT

SETTINGS = dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=6, seed=4)
PROMPT = "ROMEO:\nBut soft, what light"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    yield from start_app(tmp_path_factory, ["--engine-process"])


def strip_text(strip):
    return "".join(t["t"] for t in strip["tokens"])


def test_the_page_through_the_worker_is_the_page_in_one_process(url, app_url):
    alone, split = Client(app_url, verbose=False), Client(url, verbose=False)
    for client in (alone, split):
        client.predict(model="tiny-shakespeare", prompt=PROMPT, **SETTINGS, api_name="/step")
    a = list(alone.submit(model="tiny-shakespeare", prompt=PROMPT, **SETTINGS, tokens_per_second=0, api_name="/generate"))
    b = list(split.submit(model="tiny-shakespeare", prompt=PROMPT, **SETTINGS, tokens_per_second=0, api_name="/generate"))
    assert strip_text(a[-1][OUT["strip"]]) == strip_text(b[-1][OUT["strip"]]) and a[-1][1] == b[-1][1]  # the same seed, the same text
    view = dict(position=5, layer=1, head=2, tab="attention")
    one = alone.predict(**{k: v for k, v in SETTINGS.items()}, **view, api_name="/inspect")
    two = split.predict(**{k: v for k, v in SETTINGS.items()}, **view, api_name="/inspect")
    assert one[OUT["attention"]]["plot"] == two[OUT["attention"]]["plot"]  # the attention heatmap, drawn in the web process from the worker's recipe


def test_stop_reaches_the_worker_and_users_stay_apart(url):
    first, second = Client(url, verbose=False), Client(url, verbose=False)
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
