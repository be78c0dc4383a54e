"""The page in a real browser (Debian's chromium driven by Playwright): what a teacher and a class click.

Runs in CI; never skipped. The app runs offline, so it serves the bundled models: tiny-shakespeare
(4 layers x 6 heads, a previous-token head, no induction head) and toy-induction (2 layers x 3 heads,
attention only, trained to have an induction head). Screenshots at three viewports go to artifacts/.
"""

import os
import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
PROMPT = "JULIET:\nO Romeo, Romeo! wherefore art thou"
OVERLAP_JS = (Path(__file__).parent / "overlap.js").read_text()
VIEWPORTS = {"desktop": (1440, 900), "projector": (1280, 720), "phone": (390, 844)}
TABS = ["Chosen", "Attention", "Heads", "Lens", "Embeddings", "Why", "Experiment"]


def n_tokens(text: str) -> int:
    from gpt2viz import load_tokenizer

    return len(load_tokenizer().encode(text))


@pytest.fixture(scope="module")
def browser():
    assert os.path.exists(CHROMIUM), "Debian's chromium is required: apt-get install -y chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def open_page(browser, app_url, size="desktop"):
    w, h = VIEWPORTS[size]
    context = browser.new_context(viewport={"width": w, "height": h})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(app_url)
    page.wait_for_selector("#generate")
    wait_idle(page)
    return context, page


@pytest.fixture
def page(browser, app_url):
    context, page = open_page(browser, app_url)
    yield page
    context.close()


def strip_tokens(page) -> list[str]:
    return page.locator("#strip .tok").all_inner_texts()


def selected_index(page) -> int:
    return int(page.locator("#strip .tok.sel").get_attribute("data-pos"))


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def set_prompt(page, text: str) -> None:
    page.locator("#prompt textarea").fill(text)


def wait_idle(page) -> None:
    """Wait until no Gradio event is pending (status trackers hidden)."""
    page.wait_for_function("() => !document.querySelector('.wrap.pending, .progress-text, .eta-bar')", timeout=30_000)
    time.sleep(0.3)


def title(page, elem_id: str) -> str:
    loc = page.locator(f"#{elem_id} .js-plotly-plot .gtitle")
    loc.wait_for(state="attached")
    return loc.text_content()


def slider_max(page, elem_id: str) -> int:
    return int(page.locator(f"#{elem_id} input[type=range]").get_attribute("max"))


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()
    wait_idle(page)


def choose(page, elem_id: str, option: str) -> None:
    page.click(f"#{elem_id} input")
    page.get_by_role("option", name=option, exact=True).click()
    wait_idle(page)


def step(page) -> None:
    """Press Step and wait for its token (the first Step also shows the prompt's tokens)."""
    before = len(strip_tokens(page))
    page.click("#step")
    if before:
        expect(page.locator("#strip .tok")).to_have_count(before + 1)
    else:
        expect(page.locator("#strip .tok.sel")).to_have_count(1)
    wait_idle(page)


def test_a_class_session(page):
    ARTIFACTS.mkdir(exist_ok=True)
    expect(page.locator("#notice")).to_contain_text("Offline mode")
    set_prompt(page, PROMPT)
    set_number(page, "max_new", 12)
    set_number(page, "seed", 7)
    set_number(page, "speed", 0)

    # Generate streams: the page records every token count it renders.
    page.evaluate("""() => {
        window.__counts = [];
        new MutationObserver(() => window.__counts.push(document.querySelectorAll('#strip .tok').length))
            .observe(document.body, {childList: true, subtree: true, characterData: true});
    }""")
    n_prompt = n_tokens(PROMPT)
    page.click("#generate")
    expect(page.locator("#strip .tok")).to_have_count(n_prompt + 12, timeout=60_000)
    wait_idle(page)
    counts = page.evaluate("window.__counts")
    assert len(set(c for c in counts if c > 0)) >= 3, f"no streaming seen: {sorted(set(counts))}"
    assert "".join(strip_tokens(page)).startswith(PROMPT.replace("\n", "↵").replace(" ", "·"))
    # The newest token is selected, and every view is about it.
    n = n_prompt + 12
    assert selected_index(page) == n - 1
    expect(page.locator("#selected_label")).to_contain_text(f"token {n - 1}")
    assert f"How token {n - 1}" in title(page, "chosen_plot")
    assert f"Upcoming: token {n}" in title(page, "upcoming_plot")

    # Force the second candidate from the picker.
    page.click("#pick input")
    options = page.get_by_role("option")
    expect(options.nth(1)).to_be_visible()
    label = options.nth(1).inner_text()
    options.nth(1).click()
    page.click("#pick_btn")
    expect(page.locator("#strip .tok")).to_have_count(n + 1)
    wait_idle(page)
    assert strip_tokens(page)[-1] == re.split(r"\s+—\s+", label)[0].strip()
    expect(page.locator("#status")).to_contain_text("chosen by you")
    assert "chosen by you" in page.locator("#chosen_plot").inner_text()

    # Rewind to 3 generated tokens: the strip, the selection, the sliders and the views follow.
    page.get_by_text("Rewind", exact=True).first.click()
    set_number(page, "rewind_to", 3)
    page.click("#rewind_btn")
    expect(page.locator("#strip .tok")).to_have_count(n_prompt + 3)
    wait_idle(page)
    expect(page.locator("#status")).to_contain_text("Rewound to 3 generated tokens")
    assert selected_index(page) == n_prompt + 2 and slider_max(page, "position") == n_prompt + 2
    assert f"How token {n_prompt + 2}" in title(page, "chosen_plot")
    page.screenshot(path=str(ARTIFACTS / "screenshot.png"), full_page=True)


def test_selecting_a_token_updates_every_view(page):
    set_prompt(page, PROMPT)
    step(page)
    n = len(strip_tokens(page))
    # a click on the strip
    page.locator("#strip .tok").nth(4).click()
    wait_idle(page)
    assert selected_index(page) == 4
    expect(page.locator("#selected_label")).to_contain_text("token 4")
    assert "What the model predicted for token 4" in title(page, "chosen_plot")  # a prompt token
    expect(page.locator("#chosen_plot")).to_contain_text("rank")
    tab(page, "Attention")
    assert page.locator("#row_plot .gtitle").text_content().startswith("What token 4 ")
    tab(page, "Embeddings")
    assert "Token 4" in title(page, "emb_plot")
    # arrow keys on the slider (the way a presenter's clicker walks through tokens)
    page.locator("#position input[type=range]").focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    wait_idle(page)
    assert selected_index(page) == 6
    assert "Token 6" in title(page, "emb_plot")
    # a click on the slider's track (the end of a drag): the selection is wherever the slider lands
    track = page.locator("#position input[type=range]")
    time.sleep(0.5)
    for _ in range(3):  # a click that lands while the slider is being re-rendered is lost: click again
        box = track.bounding_box()
        page.mouse.click(box["x"] + 0.9 * box["width"], box["y"] + box["height"] / 2)
        wait_idle(page)
        if int(track.input_value()) >= 9:
            break
    landed = int(track.input_value())
    assert landed >= 9 and selected_index(page) == landed
    assert f"Token {landed}" in title(page, "emb_plot")
    # a number typed into the slider's box, then Enter
    set_number(page, "position", n - 3)
    wait_idle(page)
    assert selected_index(page) == n - 3
    tab(page, "Lens")
    assert f"{n - 3} " in page.locator("#lens_plot").inner_text()
    tab(page, "Chosen")
    assert f"token {n - 3}" in title(page, "chosen_plot")
    # layer and head by keyboard
    tab(page, "Attention")
    page.locator("#head input[type=range]").focus()
    page.keyboard.press("ArrowRight")
    wait_idle(page)
    expect(page.locator("#attn_plot .gtitle")).to_contain_text("Layer 0, head 1")


def test_controls_redraw_the_upcoming_token_without_adding_one(page):
    set_prompt(page, PROMPT)
    step(page)
    n = len(strip_tokens(page))
    before = page.locator("#upcoming_plot").inner_text()
    set_number(page, "temperature", 0.3)
    wait_idle(page)
    expect(page.locator("#upcoming_plot .gtitle-subtitle")).to_contain_text("temperature 0.3")
    after = page.locator("#upcoming_plot").inner_text()
    assert after != before and len(strip_tokens(page)) == n
    page.locator("#top_k input[type=range]").focus()
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    wait_idle(page)
    expect(page.locator("#upcoming_plot .gtitle-subtitle")).to_contain_text("top-k 3")
    assert len(strip_tokens(page)) == n
    assert len(page.locator("#pick input").input_value()) > 0


def test_stop_takes_effect_within_one_token(page):
    set_prompt(page, PROMPT)
    set_number(page, "speed", 3)
    set_number(page, "max_new", 60)
    n_prompt = n_tokens(PROMPT)
    page.click("#generate")
    page.wait_for_function(f"() => document.querySelectorAll('#strip .tok').length >= {n_prompt + 3}", timeout=30_000)
    page.click("#stop")
    at_stop = len(strip_tokens(page))
    time.sleep(2.5)  # at 3 tokens/s, 7 more would have come
    wait_idle(page)
    final = len(strip_tokens(page))
    assert at_stop <= final <= at_stop + 1, (at_stop, final)
    expect(page.locator("#status")).to_contain_text("Stopped")
    step(page)  # the session still works


def test_model_switch_and_example_bring_every_view_into_the_new_state(page):
    set_prompt(page, PROMPT)
    tab(page, "Attention")
    set_number(page, "layer", 3)
    wait_idle(page)
    set_number(page, "head", 5)
    wait_idle(page)
    step(page)
    assert slider_max(page, "layer") == 3 and slider_max(page, "head") == 5
    choose(page, "model", "toy-induction")
    expect(page.locator("#status")).to_contain_text("Switched to **toy-induction**".replace("**", ""))
    assert slider_max(page, "layer") == 1 and slider_max(page, "head") == 2
    assert page.locator("#layer input[type=number]").input_value() == "0"
    expect(page.locator("#attn_plot .gtitle")).to_contain_text("Layer 0, head 0")
    tab(page, "Heads")
    expect(page.locator("#grid_plot .gtitle")).to_contain_text("All 3 heads of layer 0")
    tab(page, "Attention")
    n = len(strip_tokens(page))
    assert n == n_tokens(PROMPT) and selected_index(page) == n - 1  # the prompt, read by the new model, no token added
    assert slider_max(page, "position") == n - 1
    tab(page, "Chosen")
    assert f"token {n - 1}" in title(page, "chosen_plot")
    # "Use this token" forces the new model's candidate into the new text
    page.click("#pick_btn")
    expect(page.locator("#strip .tok")).to_have_count(n + 1)
    wait_idle(page)
    # choosing an example reads its text at once: strip, views and ranges follow
    choose(page, "example", "Shakespeare: the previous-token head")
    expect(page.locator("#prompt textarea")).to_have_value(re.compile("^ROMEO:"))
    assert strip_tokens(page)[:3] == ["ROM", "EO", ":"]
    n = len(strip_tokens(page))
    assert selected_index(page) == n - 1 and slider_max(page, "position") == n - 1
    expect(page.locator("#example_hint")).to_contain_text("previous-token head")


INDUCTION = "Induction heads: a repeated random sequence"


def show_me(page, example: str, model: str | None = None) -> str:
    """Choose the model (if given) and the example, press Show me; the status it leaves."""
    if model:
        choose(page, "model", model)
    choose(page, "example", example)
    page.click("#show_me")
    wait_idle(page)
    return page.locator("#status").inner_text()


def test_show_me_finds_the_induction_head_or_says_it_cannot(page):
    # the bundled Shakespeare model has no induction head: it says so instead of showing noise
    assert "has no clear induction head" in show_me(page, INDUCTION)
    # the toy model trained to have one: Show me opens the head the detector measured
    assert "strongest induction head" in show_me(page, INDUCTION, "toy-induction")
    layer, head = re.search(r"Layer (\d+), head (\d+)", page.locator("#status").inner_text()).groups()
    expect(page.get_by_role("tab", name="Attention", exact=True)).to_have_attribute("aria-selected", "true")
    expect(page.locator("#attn_plot .gtitle")).to_contain_text(f"Layer {layer}, head {head}")
    # the head's badge in the all-heads overview
    tab(page, "Heads")
    cell = page.locator(f'.ov-cell[data-layer="{layer}"][data-head="{head}"]')
    expect(cell).to_contain_text("ind")
    # clicking another head in the overview selects it in the Attention tab
    page.locator('.ov-cell[data-layer="0"][data-head="0"]').click()
    wait_idle(page)
    expect(page.locator("#attn_plot .gtitle")).to_contain_text("Layer 0, head 0")
    # a previous-token head on the bundled model
    status = show_me(page, "Shakespeare: the previous-token head", "tiny-shakespeare")
    assert "Layer 0, head 0 is this model's strongest previous-token head" in status


def test_switch_off_a_head_picked_in_the_overview_and_see_where_the_texts_part(page):
    set_prompt(page, PROMPT)
    set_number(page, "max_new", 12)
    set_number(page, "speed", 0)
    page.click("#generate")
    expect(page.locator("#strip .tok")).to_have_count(n_tokens(PROMPT) + 12, timeout=60_000)
    wait_idle(page)
    # pick head 0.0 (the bundled model's previous-token head) in the overview, then switch it off
    tab(page, "Heads")
    page.locator('.ov-cell[data-layer="0"][data-head="0"]').click()
    wait_idle(page)
    tab(page, "Experiment")
    expect(page.locator("#exp_strips")).to_contain_text("No experiment yet")
    page.click("#add_head")
    wait_idle(page)
    expect(page.locator("#targets")).to_contain_text("head 0.0")
    page.click("#run_exp")
    expect(page.locator("#exp_loss .gtitle")).to_contain_text("Surprise at each token", timeout=60_000)
    wait_idle(page)
    status = page.locator("#status").inner_text()
    assert "Switched off: head 0.0 set to zero" in status and "first differ at token" in status
    first = int(re.search(r"first differ at token (\d+)", status).group(1))
    strips = page.locator("#exp_strips .exp-strip")
    expect(strips).to_have_count(2)
    marked = strips.nth(1).locator(".tok.div-first")
    expect(marked).to_have_count(1)
    assert marked.get_attribute("title") == f"token {first}"
    expect(page.locator("#exp_strips .exp-cell")).to_have_count(12)  # one difference per generated step
    # the same token in both runs before the first difference
    before = [t for t in strips.nth(0).locator(".tok").all() if int(t.get_attribute("title").split()[1]) < first]
    after = [t for t in strips.nth(1).locator(".tok").all() if int(t.get_attribute("title").split()[1]) < first]
    assert [t.inner_text() for t in before] == [t.inner_text() for t in after]
    # selecting a token shows both models' probabilities for it
    page.locator("#strip .tok").nth(first).click()
    wait_idle(page)
    expect(page.locator("#exp_bars .gtitle")).to_contain_text(f"Token {first} (")
    expect(page.get_by_role("tab", name="Experiment", exact=True)).to_have_attribute("aria-selected", "true")
    # nothing chosen: a message, not an error
    page.locator("#targets .token-remove, #targets button[aria-label*='emove']").first.click()
    wait_idle(page)
    page.click("#run_exp")
    wait_idle(page)
    expect(page.locator("#status")).to_contain_text("Choose what to switch off first")


def test_why_this_token_explains_the_selected_token_and_its_heads_open_in_the_attention_tab(page):
    set_prompt(page, PROMPT)
    step(page)
    step(page)
    tab(page, "Why")
    dla = page.locator("#why_dla")
    expect(dla).to_contain_text("Why ")
    expect(page.locator("#why_dla .why-cell")).to_have_count(4 * 6 + 4)  # every head and MLP of the bundled model
    expect(page.locator("#why_sampler")).to_contain_text("u = ")
    # the selected token follows a click on the strip
    page.locator("#strip .tok").nth(3).click()
    wait_idle(page)
    expect(dla).to_contain_text("after reading token 2")
    expect(page.locator("#why_sampler")).to_contain_text("part of your prompt")
    # another comparison token
    page.locator("#versus input, #versus textarea").first.fill(" the")
    page.locator("#versus input, #versus textarea").first.press("Enter")
    wait_idle(page)
    expect(page.locator("#status")).to_contain_text("Comparing with ' the'")
    # an MLP's cell shows its neurons here; a head's cell opens the head
    page.locator('#why_dla .why-cell[data-layer="2"][data-mlp="1"]').click()
    wait_idle(page)
    expect(page.locator("#why_neurons")).to_contain_text("MLP 2: the neurons")
    # the head with the biggest part: click it, land on it in the Attention tab
    _, layer, head = page.evaluate("""() => { let best = null;
        for (const c of document.querySelectorAll('#why_dla .why-cell[data-head]')) {
          const v = Math.abs(parseFloat(c.textContent)); if (!best || v > best[0]) best = [v, c.dataset.layer, c.dataset.head]; }
        return best; }""")
    page.locator(f'#why_dla .why-cell[data-layer="{layer}"][data-head="{head}"]').click()
    wait_idle(page)
    expect(page.get_by_role("tab", name="Attention", exact=True)).to_have_attribute("aria-selected", "true")
    expect(page.locator("#attn_plot .gtitle")).to_contain_text(f"Layer {layer}, head {head}")
    # the text coloured by where the model decided each token: every token but the first, and the key says so
    page.get_by_label("where the model decided").check()
    wait_idle(page)
    expect(page.locator("#strip_key")).to_contain_text("where the model decided")
    n = page.locator("#strip .tok").count()
    expect(page.locator("#strip .tok[class*='dec-']")).to_have_count(n - 1)
    page.screenshot(path=str(ARTIFACTS / "desktop-decided.png"))
    page.get_by_label("how likely").check()
    wait_idle(page)
    expect(page.locator("#strip .tok[class*='dec-']")).to_have_count(0)


def test_a_share_link_opens_the_same_page_in_another_browser_and_a_broken_one_says_so(browser, app_url, page):
    set_prompt(page, PROMPT)
    step(page)
    n_prompt = len(strip_tokens(page)) - 1
    page.click("#pick input")  # a forced token: the picker's third candidate
    page.get_by_role("option").nth(2).click()
    page.click("#pick_btn")
    expect(page.locator("#strip .tok")).to_have_count(n_prompt + 2)
    wait_idle(page)
    step(page)
    step(page)
    page.get_by_text("Rewind", exact=True).first.click()  # back to 3 generated tokens, then another branch
    wait_idle(page)  # every view of the last Step has answered (each sets the slider to the tokens there are)
    set_number(page, "rewind_to", 3)
    expect(page.locator("#rewind_to input[type=number]")).to_have_value("3")
    page.click("#rewind_btn")
    expect(page.locator("#strip .tok")).to_have_count(n_prompt + 3)
    wait_idle(page)
    step(page)
    tab(page, "Lens")
    page.get_by_label("rank of the final guess").check()
    wait_idle(page)
    page.get_by_label("where the model decided").check()
    wait_idle(page)
    tab(page, "Attention")
    set_number(page, "layer", 2)
    wait_idle(page)
    set_number(page, "head", 3)
    wait_idle(page)
    tab(page, "Chosen")
    page.locator("#strip .tok").nth(n_prompt + 1).click()  # the forced token
    wait_idle(page)
    chart, bars = title(page, "chosen_plot"), page.locator("#chosen_plot .bartext").all_inner_texts()
    assert "chosen by you" in page.locator("#chosen_plot").inner_text()
    page.get_by_text("Share and download").click()
    page.click("#share_btn")
    wait_idle(page)
    url = page.locator("#share_url textarea, #share_url input").first.input_value()
    assert "?s=v1." in url and len(url) < 600
    tokens = strip_tokens(page)
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    try:
        other = context.new_page()
        other.goto(app_url.rstrip("/") + "/" + url[url.index("?s="):])
        expect(other.locator("#status")).to_contain_text("Opened a shared page", timeout=60_000)
        wait_idle(other)
        assert strip_tokens(other) == tokens
        assert int(other.locator("#strip .tok.sel").get_attribute("data-pos")) == n_prompt + 1
        expect(other.get_by_role("tab", name="Chosen", exact=True)).to_have_attribute("aria-selected", "true")
        assert title(other, "chosen_plot") == chart and other.locator("#chosen_plot .bartext").all_inner_texts() == bars
        expect(other.locator("#prompt textarea")).to_have_value(PROMPT)
        tab(other, "Attention")  # the same selected head
        expect(other.locator("#attn_plot .gtitle")).to_contain_text("Layer 2, head 3")
        expect(other.get_by_label("where the model decided")).to_be_checked()
        assert other.locator("#strip .tok[class*='dec-']").count() == len(tokens) - 1
        tab(other, "Lens")  # the lens in the mode it had
        expect(other.get_by_label("rank of the final guess")).to_be_checked()
        expect(other.locator("#lens_plot .gtitle")).to_contain_text("rank of the final guess")
        for broken, message in ((url.split("?s=")[1][:-8], "This link is damaged"), ("__import__('os')", "unknown kind")):
            fresh = context.new_page()
            fresh.goto(app_url.rstrip("/") + "/?s=" + broken)
            # the warning pops up with the page; #status may already have been redrawn by an event of the loading page
            expect(fresh.locator(".toast-body").first).to_contain_text(message, timeout=60_000)
            assert strip_tokens(fresh) == []
    finally:
        context.close()


def test_a_share_link_s_page_is_not_undone_by_the_select_the_browser_sends_as_it_mounts(browser, app_url, page):
    """The page selects its open tab when it mounts, at the moment its load asks for the link; the server may run
    that select after the link's text is in the state. Here it is made to (held until the link's page is shown):
    the link's token, tab and views stay."""
    import json

    set_prompt(page, PROMPT)
    step(page)
    step(page)
    n_prompt = len(strip_tokens(page)) - 2
    page.locator("#strip .tok").nth(n_prompt).click()
    wait_idle(page)
    tab(page, "Lens")
    page.get_by_text("Share and download").click()
    page.click("#share_btn")
    wait_idle(page)
    url = page.locator("#share_url textarea, #share_url input").first.input_value()
    lens = title(page, "lens_plot")
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    try:
        other, held = context.new_page(), []

        def hold(route):  # the mount's select: the open tab's name among its inputs (the load sends the state only)
            data = json.loads(route.request.post_data or "{}").get("data") or []
            if not held and "chosen" in data:
                held.append(route)
            else:
                route.continue_()
        other.route("**/queue/join*", hold)
        other.goto(app_url.rstrip("/") + "/" + url[url.index("?s="):])
        expect(other.locator("#status")).to_contain_text("Opened a shared page", timeout=60_000)
        assert len(held) == 1, "the page no longer selects its tab as it mounts: this test holds nothing"
        held[0].continue_()
        time.sleep(1.0)
        wait_idle(other)
        assert int(other.locator("#strip .tok.sel").get_attribute("data-pos")) == n_prompt
        expect(other.get_by_role("tab", name="Lens", exact=True)).to_have_attribute("aria-selected", "true")
        assert other.locator("#tab textarea, #tab input").first.input_value() == "lens"  # a Step draws the lens
        assert title(other, "lens_plot") == lens
    finally:
        context.close()


def test_downloads_and_saving_a_chart(browser, app_url):
    context = browser.new_context(viewport={"width": 1280, "height": 720}, accept_downloads=True)
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(app_url)
        page.wait_for_selector("#generate")
        wait_idle(page)
        set_prompt(page, PROMPT)
        step(page)
        # a chart by itself: the SVG button beside plotly's camera, saved under the chart's title
        page.hover("#upcoming_plot .js-plotly-plot")
        with page.expect_download() as got:
            page.click("#upcoming_plot .gv-svg")
        assert re.fullmatch(r"gpt2viz-upcoming-token-\d+\.svg", got.value.suggested_filename)
        assert Path(got.value.path()).read_text().startswith("<svg")
        page.get_by_text("Share and download").click()
        for choice, suffix, magic in (("the handout (PDF)", ".pdf", b"%PDF"), ("a Python script", ".py", b'"""Recreates')):
            page.click("#download_what input")
            page.get_by_role("option", name=re.compile(re.escape(choice))).click()
            page.click("#download_btn")
            wait_idle(page)
            expect(page.locator("#status")).to_contain_text("Ready:")
            link = page.locator("#download_file a[download]").first
            expect(link).to_have_attribute("download", f"gpt2viz-tiny-shakespeare-{'handout.pdf' if suffix == '.pdf' else 'reproduce.py'}")
            with page.expect_download() as got:
                link.click()
            assert Path(got.value.path()).read_bytes().startswith(magic)
        page.screenshot(path=str(ARTIFACTS / "projector-download.png"))
    finally:
        context.close()


def test_the_induction_lesson_runs_end_to_end_or_says_it_cannot(page):
    tab(page, "Experiment")
    page.click("#lesson")
    wait_idle(page)
    # the bundled Shakespeare model has no induction head: its previous-token head, 0.0, is switched off instead
    expect(page.locator("#status")).to_contain_text("Lesson: the previous-token head", timeout=60_000)
    expect(page.locator("#status")).to_contain_text("head 0.0")
    expect(page.locator("#targets")).to_contain_text("head 0.0")
    expect(page.locator("#exp_strips .exp-strip")).to_have_count(2)
    choose(page, "model", "toy-induction")
    tab(page, "Experiment")
    page.click("#lesson")
    expect(page.locator("#exp_loss .gtitle")).to_contain_text("Surprise at each token", timeout=60_000)
    wait_idle(page)
    status = page.locator("#status").inner_text()
    assert "Switched off: head 1.0, head 1.1" in status
    before, after = map(float, re.search(r"second copy, which only copying can predict: ([0-9]+\.[0-9]+) → ([0-9]+\.[0-9]+)", status).groups())
    first_before, first_after = map(float, re.search(r"first copy, which nothing can predict: ([0-9]+\.[0-9]+) → ([0-9]+\.[0-9]+)", status).groups())
    assert before < 1.0 and after > before + 3.0 and abs(first_after - first_before) < 0.5
    expect(page.locator("#targets")).to_contain_text("head 1.0")
    expect(page.locator("#prompt textarea")).to_have_value(re.compile(r"^( [a-z]+){24}$"))
    expect(page.locator("#exp_strips .tok.div-first")).to_have_count(1)  # the copying stops: the texts part


def check_every_tab(page, size: str, prefix: str) -> None:
    """Generate 20 tokens, then open every tab: no two text elements of a figure overlap, and no figure
    is wider than the screen. Screenshots of each tab into artifacts/."""
    set_prompt(page, PROMPT)
    set_number(page, "max_new", 20)
    set_number(page, "speed", 0)
    page.click("#generate")
    expect(page.locator("#strip .tok")).to_have_count(n_tokens(PROMPT) + 20, timeout=60_000)
    wait_idle(page)
    ARTIFACTS.mkdir(exist_ok=True)
    for name in TABS:
        tab(page, name)
        if name == "Experiment":  # its figures exist once an experiment ran: switch off the selected head
            page.click("#add_head")
            wait_idle(page)
            page.click("#run_exp")
            expect(page.locator("#exp_loss .gtitle")).to_contain_text("Surprise at each token", timeout=60_000)
            wait_idle(page)
        time.sleep(0.5)  # plotly lays out after the update
        overlaps = page.evaluate(OVERLAP_JS)
        assert overlaps == [], f"{prefix} {size} {name}: {overlaps[:5]}"
        if name == "Attention":  # plotly drops category labels that do not fit: every key and query must be labelled
            x, y = (page.locator(f"#attn_plot .{axis}tick text").count() for axis in ("x", "y"))
            assert x == y > 0, f"{prefix} {size}: {x} keys labelled for {y} queries"
        if name == "Heads":
            page.locator("#per_head input").check()
            wait_idle(page)
            time.sleep(0.5)
            overlaps = page.evaluate(OVERLAP_JS)
            assert overlaps == [], f"{prefix} {size} per-head scale: {overlaps[:5]}"
            page.locator("#per_head input").uncheck()
            wait_idle(page)
        page.screenshot(path=str(ARTIFACTS / f"{prefix}{size}-{name.lower().replace(' ', '-')}.png"), full_page=True)
        plots = page.locator(".js-plotly-plot")
        for i in range(plots.count()):
            box = plots.nth(i).bounding_box()
            if box and box["width"] > 0:
                assert box["x"] >= 0 and box["x"] + box["width"] <= VIEWPORTS[size][0] + 1, f"a figure is wider than the {size} screen"


@pytest.mark.parametrize("size", list(VIEWPORTS))
def test_no_text_overlaps_in_any_figure(browser, app_url, size):
    context, page = open_page(browser, app_url, size)
    try:
        check_every_tab(page, size, "")
    finally:
        context.close()


@pytest.mark.parametrize("size", list(VIEWPORTS))
def test_no_text_overlaps_at_gpt2s_layer_and_head_counts(browser, deep_app_url, size):
    shape, url = deep_app_url  # 12 layers x 12 heads (gpt2), 24 x 16 (gpt2-medium)
    context, page = open_page(browser, url, size)
    try:
        check_every_tab(page, size, f"{shape}-")
        tab(page, "Lens")
        layers = 12 if shape == "12x12" else 24
        assert "emb" in page.locator("#lens_plot").inner_text() and str(layers - 1) in page.locator("#lens_plot").inner_text()
        tab(page, "Heads")
        assert page.locator(".ov-cell").count() == {"12x12": 144, "24x16": 384}[shape]
    finally:
        context.close()


def test_phone_shows_the_result_right_under_step(browser, app_url):
    context, page = open_page(browser, app_url, "phone")
    try:
        page.locator("#step").scroll_into_view_if_needed()
        page.click("#step")
        wait_idle(page)
        page.wait_for_selector("#strip .tok.sel")
        box = page.locator("#strip .tok.sel").bounding_box()
        assert 0 <= box["y"] and box["y"] + box["height"] <= VIEWPORTS["phone"][1], box
        assert page.evaluate("() => { const s = document.querySelector('#strip .strip'); return s.scrollWidth <= s.clientWidth + 1; }"), \
            "the token strip is wider than the phone's screen"
        last = page.locator("#strip .tok").last.bounding_box()
        assert last["x"] + last["width"] <= VIEWPORTS["phone"][0], "a token runs off the screen"
        step_box = page.locator("#step").bounding_box()
        assert step_box["y"] >= 0 and step_box["y"] + step_box["height"] <= VIEWPORTS["phone"][1]
        for name in TABS:  # every tab reachable, none behind an overflow menu
            expect(page.get_by_role("tab", name=name, exact=True)).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "phone-after-step.png"))
    finally:
        context.close()


def test_bad_input_shows_a_message_not_a_traceback(page):
    set_prompt(page, "")
    page.click("#step")
    expect(page.locator("#status")).to_contain_text("The prompt is empty")
    set_prompt(page, "ROMEO:\n")
    step(page)
    page.locator("#typed textarea, #typed input").first.fill("wherefore art")
    page.click("#typed_btn")
    expect(page.locator("#status")).to_contain_text("not a single token")
    page.locator("#typed textarea, #typed input").first.fill("love")
    page.click("#typed_btn")
    expect(page.locator("#status")).to_contain_text("' love'")
    assert "Traceback" not in page.content()
