"""The page in a real browser (Debian's chromium driven by Playwright): what a teacher clicks.

Runs in CI; never skipped. Screenshots go to artifacts/ (the README's screenshot is one).
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


@pytest.fixture(scope="module")
def browser():
    assert os.path.exists(CHROMIUM), "Debian's chromium is required: apt-get install -y chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1440, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(app_url)
    page.wait_for_selector("#generate")
    yield page
    context.close()


def strip_tokens(page) -> list[str]:
    return page.locator("#strip span.token span.text").all_inner_texts()


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def wait_idle(page) -> None:
    """Wait until no Gradio event is pending (status trackers hidden)."""
    page.wait_for_function("() => !document.querySelector('.wrap.pending, .progress-text')", timeout=30_000)
    time.sleep(0.3)


def plot_title(page, elem_id: str) -> str:
    loc = page.locator(f"#{elem_id} .js-plotly-plot .gtitle")
    loc.wait_for(state="attached")
    return loc.text_content()


def test_a_class_session(page):
    ARTIFACTS.mkdir(exist_ok=True)
    # Offline here: the page says so and runs the bundled model.
    expect(page.locator("#notice")).to_contain_text("Offline mode")
    expect(page.locator("#notice")).to_contain_text("tiny-shakespeare")

    page.locator("#prompt textarea").fill(PROMPT)
    set_number(page, "max_new", 12)
    set_number(page, "seed", 7)

    # Generate streams: the token count grows while the request runs. The page records every count it
    # renders (a MutationObserver), so the check does not depend on how fast this test can poll.
    page.evaluate("""() => {
        window.__counts = [];
        new MutationObserver(() => window.__counts.push(document.querySelectorAll('#strip span.token').length))
            .observe(document.body, {childList: true, subtree: true, characterData: true});
    }""")
    from gpt2viz import load_tokenizer

    n_prompt = len(load_tokenizer().encode(PROMPT))
    page.click("#generate")
    expect(page.locator("#strip span.token")).to_have_count(n_prompt + 12, timeout=60_000)
    wait_idle(page)
    assert len(strip_tokens(page)) == n_prompt + 12, strip_tokens(page)
    counts = page.evaluate("window.__counts")
    assert len(set(c for c in counts if c > 0)) >= 3, f"no streaming seen: {sorted(set(counts))}"
    assert "".join(strip_tokens(page)).startswith(PROMPT.replace("\n", "↵"))
    assert "How token" in plot_title(page, "next_plot")
    expect(page.locator("#next_plot")).to_contain_text("after your settings")

    # Step adds exactly one token.
    before = len(strip_tokens(page))
    page.click("#step")
    expect(page.locator("#strip span.token")).to_have_count(before + 1)
    wait_idle(page)

    # Force the second candidate from the picker.
    page.click("#pick input")
    options = page.get_by_role("option")
    expect(options.nth(1)).to_be_visible()
    label = options.nth(1).inner_text()
    options.nth(1).click()
    page.click("#pick_btn")
    expect(page.locator("#strip span.token")).to_have_count(before + 2)
    wait_idle(page)
    shown = re.split(r"\s+—\s+", label)[0].strip().replace("·", " ")
    assert strip_tokens(page)[-1].strip() == shown.strip()
    expect(page.locator("#status")).to_contain_text("chosen by you")

    # Rewind to 3 generated tokens.
    page.get_by_text("Rewind", exact=True).first.click()
    set_number(page, "rewind_to", 3)
    page.click("#rewind_btn")
    expect(page.locator("#strip span.token")).to_have_count(n_prompt + 3)
    wait_idle(page)
    expect(page.locator("#status")).to_contain_text("Rewound to 3 generated tokens")

    # Attention: choose layer 1, head 2; select the 5th token by clicking it.
    page.get_by_role("tab", name="Attention").click()
    set_number(page, "layer", 1)
    wait_idle(page)
    set_number(page, "head", 2)
    wait_idle(page)
    expect(page.locator("#attn_plot .gtitle")).to_contain_text("Layer 1, head 2")
    page.locator("#strip span.token").nth(4).click()
    wait_idle(page)
    expect(page.locator("#position input[type=number]")).to_have_value("4")
    expect(page.locator("#row_plot .gtitle")).to_contain_text("What token 4")
    expect(page.locator("#row_plot")).to_contain_text("average over heads")
    expect(page.locator("#grid_plot .gtitle")).to_contain_text("All 6 heads of layer 1")
    heat_cells = page.locator("#attn_plot .heatmaplayer image, #attn_plot .hm image")
    assert heat_cells.count() >= 1, "the heatmap was not drawn"
    page.screenshot(path=str(ARTIFACTS / "attention.png"), full_page=True)

    # Logit lens: a labelled grid of layers.
    page.get_by_role("tab", name="Logit lens").click()
    expect(page.locator("#lens_plot .gtitle")).to_contain_text("Logit lens")
    expect(page.locator("#lens_plot")).to_contain_text("block 3")
    expect(page.locator("#lens_plot")).to_contain_text("embeddings")
    page.screenshot(path=str(ARTIFACTS / "logit_lens.png"), full_page=True)

    # Embeddings: the three plots of token 4.
    page.get_by_role("tab", name="Embeddings").click()
    expect(page.locator("#emb_plot .gtitle")).to_contain_text("Token 4")
    expect(page.locator("#norm_plot .gtitle")).to_contain_text("residual stream")
    expect(page.locator("#traj_plot .gtitle")).to_contain_text("PCA")
    page.screenshot(path=str(ARTIFACTS / "embeddings.png"), full_page=True)

    page.get_by_role("tab", name="Next token").click()
    page.screenshot(path=str(ARTIFACTS / "screenshot.png"), full_page=True)


def test_bad_input_shows_a_message_not_a_traceback(page):
    page.locator("#prompt textarea").fill("")
    page.click("#step")
    expect(page.locator("#status")).to_contain_text("The prompt is empty")
    page.locator("#prompt textarea").fill("ROMEO:\n")
    page.click("#step")
    wait_idle(page)
    page.locator("#typed textarea, #typed input").first.fill("wherefore art")
    page.click("#typed_btn")
    expect(page.locator("#status")).to_contain_text("not a single token")
    assert "Traceback" not in page.content()
