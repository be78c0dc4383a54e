"""Share links (gpt2viz/share.py): state -> link -> state is the identity; links stay short; anything else
that claims to be a link gets a ShareLinkError that says what is wrong, never a crash."""

from __future__ import annotations

import base64
import json
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2viz.interventions import AblateHeads, AblateMLP, AblateNeurons, Patch, ScaleHead, Steer
from gpt2viz.share import MAX_LINK_CHARS, Shared, ShareLinkError, decode, encode

SETTINGS = dict(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.2, max_new_tokens=30, seed=7)

interventions = st.one_of(
    st.builds(AblateHeads, layer=st.integers(0, 47), heads=st.lists(st.integers(0, 24), min_size=1, max_size=4, unique=True).map(tuple),
              mode=st.sampled_from(["zero", "mean"])),
    st.builds(AblateMLP, layer=st.integers(0, 47), mode=st.sampled_from(["zero", "mean"])),
    st.builds(AblateNeurons, layer=st.integers(0, 47), neurons=st.lists(st.integers(0, 4095), min_size=1, max_size=5, unique=True).map(tuple)),
    st.builds(ScaleHead, layer=st.integers(0, 47), head=st.integers(0, 24), factor=st.floats(-10, 10, allow_nan=False)),
    st.builds(Patch, hook=st.sampled_from(["blocks.1.resid_pre", "embed", "pattern.0"]), source=st.text(min_size=1, max_size=40)),
    st.builds(Steer, layer=st.integers(0, 11), plus=st.text(min_size=1, max_size=20), minus=st.text(min_size=1, max_size=20),
              scale=st.floats(-20, 20, allow_nan=False)),
)


@st.composite
def states(draw):
    n = draw(st.integers(0, 60))
    return Shared(
        model=draw(st.sampled_from(["gpt2", "gpt2-medium", "tiny-shakespeare", "toy-induction", "local: my-model"])),
        prompt=draw(st.text(min_size=1, max_size=200)),
        settings=dict(temperature=draw(st.floats(0, 2, allow_nan=False)), top_k=draw(st.integers(0, 200)),
                      top_p=draw(st.floats(0.05, 1.0, allow_nan=False)), repetition_penalty=draw(st.floats(1, 2, allow_nan=False)),
                      max_new_tokens=draw(st.integers(1, 200)), seed=draw(st.integers(0, 2**63 - 1))),
        tokens=draw(st.lists(st.integers(0, 50256), min_size=n, max_size=n)),
        methods="".join(draw(st.lists(st.sampled_from("sgf"), min_size=n, max_size=n))),
        interventions=draw(st.lists(interventions, max_size=4)),
        position=draw(st.one_of(st.none(), st.integers(0, 1023))), layer=draw(st.integers(0, 47)), head=draw(st.integers(0, 24)),
        tab=draw(st.sampled_from(["chosen", "attention", "overview", "lens", "embed", "experiment", "why"])),
        lens_mode=draw(st.sampled_from(["top", "rank", "entropy"])), strip_colour=draw(st.sampled_from(["prob", "decided"])),
        versus=draw(st.one_of(st.none(), st.integers(0, 50256))))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states())
def test_a_link_replays_exactly_the_state_it_was_made_from(state):
    link = encode(state)
    assert decode(link) == state
    assert link.startswith("v1.") and all(c.isalnum() or c in "._-" for c in link)  # safe in a URL as it is


def test_a_200_token_run_with_20_forced_tokens_and_an_experiment_fits_in_1200_characters():
    import random

    rng = random.Random(0)
    tokens = [rng.randrange(50257) for _ in range(200)]  # random ids: the worst case for compression
    methods = "".join("f" if i % 10 == 0 else "s" for i in range(200))
    state = Shared("gpt2", "The history of the city begins with a small market by the river, where traders from the north",
                   SETTINGS, tokens, methods, [AblateHeads(layer=5, heads=(1, 5)), AblateMLP(layer=0)], 150, 5, 1, "experiment")
    link = encode(state)
    assert len(link) <= 1200, len(link)
    assert decode(link) == state


def _forge(header: dict, ids: bytes = b"", wide: int = 0) -> str:
    head = json.dumps(header).encode()
    body = bytes([wide]) + len(head).to_bytes(4, "little") + head + ids
    return "v1." + base64.urlsafe_b64encode(zlib.compress(body)).decode().rstrip("=")


GOOD = {"m": "gpt2", "p": "Hi", "s": list(SETTINGS.values()), "k": "", "i": [], "v": [None, 0, 0, "chosen"]}


@pytest.mark.parametrize("link, message", [
    ("", "empty"),
    (None, "empty"),
    ("v2.AAAA", "unknown kind"),
    ("v1.abc$%", "characters a link of this app never has"),
    ("v1." + "A" * (MAX_LINK_CHARS + 1), "too long"),
    (encode(Shared("gpt2", "Hello there", SETTINGS, [1, 2, 3], "ssf"))[:-6], "damaged or cut short"),
    ("v1." + base64.urlsafe_b64encode(zlib.compress(b"\x00" * 200_000)).decode().rstrip("="), "does not inflate"),  # a zip bomb
    (_forge({**GOOD, "m": "../../etc/passwd"}), "names no valid model"),
    (_forge({**GOOD, "m": "/root/model"}), "names no valid model"),
    (_forge({**GOOD, "p": ""}), "prompt"),
    (_forge({**GOOD, "s": [float("inf")] + list(SETTINGS.values())[1:]}), "sampling settings are not valid"),
    (_forge({**GOOD, "s": [1.0, 0, 1.0]}), "incomplete"),
    (_forge({**GOOD, "k": "s"}), "does not match its tokens"),
    (_forge({**GOOD, "k": "x"}, ids=b"\x01\x00"), "does not match its tokens"),
    (_forge({**GOOD, "i": [{"kind": "exec", "code": "__import__('os').system('rm -rf /')"}]}), "experiment is not valid"),
    (_forge({**GOOD, "i": [{"kind": "ablate_heads", "layer": 0, "heads": [0], "extra": 1}]}), "experiment is not valid"),
    (_forge({**GOOD, "v": [-1, 0, 0, "chosen"]}), "selected token"),
    (_forge({**GOOD, "v": [None, 0, 0, "<script>"]}), "unknown tab"),
    (_forge({**GOOD, "v": [None, 0, 0, "lens", "eval", "prob", None]}), "view mode the page does not have"),
    (_forge({**GOOD, "v": [None, 0, 0, "why", "top", "prob", -5]}), "comparison token"),
    (_forge({**GOOD, "v": [None, 0, 0, "why", "top", "prob"]}), "incomplete"),
    (_forge({**GOOD, "x": 1}), "does not describe a page"),
    (_forge(GOOD, ids=b"\x01"), "do not add up"),
    ("v1." + base64.urlsafe_b64encode(zlib.compress(b"\x00\xff\xff\xff\x7f{}")).decode().rstrip("="), "do not add up"),
])
def test_anything_else_is_refused_with_what_is_wrong(link, message):
    with pytest.raises(ShareLinkError, match=message):
        decode(link)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_random_text_never_crashes_the_decoder(text):
    try:
        decode("v1." + text)
    except ShareLinkError:
        pass


def test_a_link_made_before_the_view_modes_were_kept_still_opens():
    state = decode(_forge({**GOOD, "v": [3, 1, 2, "lens"]}))
    assert (state.position, state.tab, state.lens_mode, state.strip_colour, state.versus) == (3, "lens", "top", "prob", None)
