"""The web page end to end in a real headless Chromium (Debian's, driven by Playwright) against uvicorn."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (`make browser`)"),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (`pip install -e .[dev]`)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, running_server):
    context = browser.new_context(viewport={"width": 960, "height": 1100})
    try:
        page = context.new_page()
        page.goto(running_server + "/")
        yield page
    finally:
        context.close()


def test_link_a_typed_mention(page, tmp_path):
    page.fill("#sentence", "Mercury sang Bohemian Rhapsody with Queen.")
    page.fill("#mention", "Mercury")
    page.click("#link-button")
    page.wait_for_selector("#results li.result")
    first = page.locator("#results li.result").first
    assert first.get_attribute("data-qid") == "Q15869"
    assert first.locator(".name").inner_text() == "Freddie Mercury"
    assert "Queen" in first.locator(".text").inner_text()
    assert first.locator(".unit").count() >= 3                   # tglu, vdlu, cmfu (+ retrieval)
    page.wait_for_selector("#results li.result .thumb img")     # the entity's image, through the API
    assert page.locator("#nil-banner").is_hidden() and page.locator("#error").is_hidden()
    assert "8 entities" in page.locator("#index-info").inner_text()
    page.screenshot(path=str(tmp_path / "web-page.png"), full_page=True)
    assert (tmp_path / "web-page.png").stat().st_size > 10_000


def test_selecting_the_mention_in_the_sentence_sends_its_span(page):
    sentence = "We flew to Paris to see the Eiffel Tower."
    page.fill("#sentence", sentence)
    start = sentence.index("Paris")
    page.evaluate(f"""() => {{
        const box = document.getElementById('sentence');
        box.focus();
        box.setSelectionRange({start}, {start + 5});
        box.dispatchEvent(new Event('select'));
    }}""")
    assert page.input_value("#mention") == "Paris"
    assert f"{start}–{start + 5}" in page.inner_text("#span-info")
    page.click("#link-button")
    page.wait_for_selector("#results li.result")
    assert page.locator("#results li.result").first.get_attribute("data-qid") == "Q90"


def test_errors_are_shown(page):
    page.fill("#sentence", "Nobody is named here.")
    page.fill("#mention", "Atlantis")
    page.click("#link-button")
    page.wait_for_selector("#error:not([hidden])")
    assert "does not occur" in page.inner_text("#error")
    page.fill("#sentence", "")
    page.click("#link-button")
    assert "Type a sentence" in page.inner_text("#error")
