"""Every public endpoint of the running app through gradio_client: normal use, streaming,
cancellation, and bad input that must come back as a message, never a crash."""

import threading
import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

MODEL = "tiny-shakespeare"
PROMPT = "ROMEO:\nBut soft, what light"
DEFAULTS = dict(temperature=1.0, top_k=0, top_p=1.0, penalty=1.0, max_new=5, seed=0)


def args(prompt=PROMPT, model=MODEL, **overrides):
    values = {**DEFAULTS, **overrides}
    return (model, prompt, values["temperature"], values["top_k"], values["top_p"], values["penalty"], values["max_new"], values["seed"])


def tokens(strip):
    return [t["token"] for t in strip]


def text(strip):
    """The text of the token strip (newline tokens are shown as ↵)."""
    return "".join(tokens(strip)).replace("↵", "\n")


@pytest.fixture
def client(app_url):
    return Client(app_url, verbose=False)


def test_endpoints_are_the_documented_ones(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert names == {"/generate", "/step", "/reset", "/stop", "/force_candidate", "/force_text", "/rewind", "/inspect", "/set_model"}


def test_generate_streams_one_token_at_a_time(client):
    job = client.submit(*args(max_new=6), api_name="/generate")
    updates = list(job)
    assert len(updates) == 6
    n_prompt = len(tokens(updates[0][0])) - 1
    assert [len(tokens(u[0])) for u in updates] == list(range(n_prompt + 1, n_prompt + 7))
    strip, plot, status = updates[-1]
    assert text(strip).startswith(PROMPT)
    assert plot["type"] == "plotly" and "How token" in plot["plot"]
    assert "Last token" in status


def test_step_adds_exactly_one_token_and_continues_the_text(client):
    first = client.predict(*args(), api_name="/step")
    second = client.predict(*args(), api_name="/step")
    assert len(tokens(second[0])) == len(tokens(first[0])) + 1
    assert tokens(second[0])[:-1] == tokens(first[0])


def test_same_seed_same_text_and_reset(client):
    a = list(client.submit(*args(max_new=8, seed=11), api_name="/generate"))[-1][0]
    reset = client.predict(*args(seed=11), api_name="/reset")
    assert "Back to the prompt" in reset[2]
    b = list(client.submit(*args(max_new=8, seed=11), api_name="/generate"))[-1][0]
    assert tokens(a) == tokens(b)


def test_forcing_a_candidate_and_a_typed_token(client):
    client.predict(*args(), api_name="/step")
    forced = client.predict(MODEL, PROMPT, 262, *args()[2:], api_name="/force_candidate")  # 262 = " the"
    assert tokens(forced[0])[-1] == " the" and "chosen by you" in forced[2]
    typed = client.predict(MODEL, PROMPT, " Juliet", *args()[2:], api_name="/force_text")
    assert tokens(typed[0])[-1] == " Juliet"
    by_id = client.predict(MODEL, PROMPT, "#11", *args()[2:], api_name="/force_text")
    assert tokens(by_id[0])[-1] == ","


def test_rewind_to_an_earlier_token(client):
    gen = list(client.submit(*args(max_new=6, seed=3), api_name="/generate"))[-1][0]
    back = client.predict(MODEL, PROMPT, 2, *args()[2:], api_name="/rewind")
    assert tokens(back[0]) == tokens(gen)[: len(tokens(gen)) - 4]
    assert "Rewound to 2 generated tokens" in back[2]


def test_inspect_draws_every_view(client):
    client.predict(*args(), api_name="/step")
    plots = client.predict(3, 1, 2, *args()[2:], api_name="/inspect")
    assert len(plots) == 7 and all(p["type"] == "plotly" for p in plots)
    assert "Layer 1, head 2" in plots[0]["plot"]
    assert "What token 3" in plots[1]["plot"]
    assert "Logit lens" in plots[3]["plot"]


def test_stop_cancels_a_running_generation(client, app_url):
    job = client.submit(*args(max_new=200), api_name="/generate")
    while len(job.outputs()) < 3:
        time.sleep(0.05)
    client.predict(api_name="/stop")
    deadline = time.time() + 30
    while not job.done() and time.time() < deadline:
        time.sleep(0.1)
    assert job.done()
    assert len(job.outputs()) < 150
    after = client.predict(*args(), api_name="/step")  # the session still works
    assert "Last token" in after[2]


def test_client_side_cancel_also_stops(client):
    job = client.submit(*args(max_new=200), api_name="/generate")
    while len(job.outputs()) < 2:
        time.sleep(0.05)
    job.cancel()
    time.sleep(1.0)
    n = len(job.outputs())
    assert n < 150


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c: c.predict(*args(prompt=""), api_name="/step"), "prompt is empty"),
        (lambda c: c.predict(*args(prompt="   \n "), api_name="/generate"), "prompt is empty"),
        (lambda c: c.predict(*args(prompt=" thou" * 300), api_name="/step"), "can only read 256 tokens"),
        (lambda c: c.predict(*args(prompt="x" * 30000), api_name="/step"), "prompt is too long"),
        (lambda c: c.predict(MODEL, PROMPT, " no such token here", *args()[2:], api_name="/force_text"), "not a single token"),
        (lambda c: c.predict(MODEL, PROMPT, "#123456", *args()[2:], api_name="/force_text"), "There is no token #123456"),
        (lambda c: c.predict(MODEL, PROMPT, 999, *args()[2:], api_name="/rewind"), "Can rewind to between 0 and"),
        (lambda c: c.predict(MODEL, PROMPT, None, *args()[2:], api_name="/force_candidate"), "Pick one of the candidates"),
    ],
    ids=["empty", "blank", "over-context", "over-length", "multi-token", "no-such-id", "rewind-range", "no-pick"],
)
def test_bad_input_gets_a_friendly_message(client, call, message):
    out = call(client)
    assert message in out[-1] and out[-1].startswith("⚠️")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(temperature=5.0), "greater than maximum"),
        (dict(top_p=0.0), "less than minimum"),
        (dict(seed=-4), "less than minimum"),
        (dict(max_new=10_000), "greater than maximum"),
    ],
)
def test_out_of_range_values_are_refused_with_a_reason(client, overrides, message):
    with pytest.raises(AppError, match=message):
        client.predict(*args(**overrides), api_name="/step")


def test_unknown_model_is_refused(client):
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict("../../etc/passwd", api_name="/set_model")


def test_users_do_not_see_each_other(app_url):
    alice, bob = Client(app_url, verbose=False), Client(app_url, verbose=False)
    a = alice.predict(*args(prompt="ROMEO:\nO"), api_name="/step")
    b_results = []
    thread = threading.Thread(target=lambda: b_results.append(list(bob.submit(*args(prompt="JULIET:\nAy", max_new=4), api_name="/generate"))))
    thread.start()
    a2 = alice.predict(*args(prompt="ROMEO:\nO"), api_name="/step")
    thread.join(60)
    assert text(a2[0]).startswith("ROMEO:\nO") and len(tokens(a2[0])) == len(tokens(a[0])) + 1
    assert text(b_results[0][-1][0]).startswith("JULIET:\nAy")
    assert "ROMEO" not in text(b_results[0][-1][0])


def test_server_survives_everything_above(client):
    out = client.predict(*args(), api_name="/step")
    assert "Last token" in out[2]
