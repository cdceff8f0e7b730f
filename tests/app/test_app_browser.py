"""A real browser (Debian's chromium through playwright) uses the running app: upload an image,
ask, watch the answer stream in, save a screenshot; clear the conversation and start over.

The screenshot is written to the test's tmp folder; with STEP3_EDGE_SAVE_SCREENSHOT=1 it is
also copied to bench/results/app_screenshot.png.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from app_helpers import (EXAMPLES, REPO, Served, ask_in_browser, browser_unavailable,
                         launch_browser, open_app)

from step3_edge.app.gradio_app import ERROR_PREFIX

pytestmark = pytest.mark.timeout(600)


def test_browser_upload_ask_and_watch_the_answer_stream(gradio_app: Served,
                                                        tmp_path: Path) -> None:
    reason = browser_unavailable()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_browser(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            open_app(page, gradio_app.url + "/")
            out = ask_in_browser(page, EXAMPLES / "three_shapes.png", "Describe the image.")
            shot = tmp_path / "app_screenshot.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    texts = [s["text"] for s in out["seen"]]
    assert texts, "no answer appeared in the chat"
    assert not texts[-1].startswith(ERROR_PREFIX.strip()), texts[-1]
    assert len(texts) >= 3, f"the answer did not stream: {texts!r}"
    grew = sum(len(b) > len(a) for a, b in zip(texts, texts[1:], strict=False))
    assert grew >= 2, texts
    assert re.search(r"speed: \*?\*?[\d.]+ tokens/s", out["stats"]) or "tokens/s" in out["stats"]
    assert shot.stat().st_size > 10_000
    if os.environ.get("STEP3_EDGE_SAVE_SCREENSHOT"):
        dest = REPO / "bench" / "results" / "app_screenshot.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, dest)


def _prompt_tokens(stats: str) -> int:
    m = re.search(r"tokens: (\d+) prompt", stats.replace("*", ""))
    assert m, stats
    return int(m.group(1))


def test_browser_clear_starts_a_new_conversation(gradio_app: Served) -> None:
    """A follow-up carries the earlier turns; after the chat's Clear button it does not, and
    the stats panel stays."""
    reason = browser_unavailable()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    question = "How many shapes are there?"
    with sync_playwright() as p:
        browser = launch_browser(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            open_app(page, gradio_app.url + "/")
            first = ask_in_browser(page, EXAMPLES / "shapes.png", "What colour is the circle?")
            follow = ask_in_browser(page, None, question)
            page.click("#chatbot button[aria-label=Clear]")
            page.wait_for_function("() => document.querySelectorAll("
                                   "'#chatbot [data-testid=\"bot\"]').length === 0",
                                   timeout=30_000)
            after = ask_in_browser(page, None, question)
            bots = page.eval_on_selector_all('#chatbot [data-testid="bot"]', "e => e.length")
        finally:
            browser.close()
    assert _prompt_tokens(follow["stats"]) > _prompt_tokens(first["stats"]) > 100
    assert _prompt_tokens(after["stats"]) < 100 < _prompt_tokens(first["stats"])  # no image
    assert bots == 1 and "tokens/s" in after["stats"] and "RSS" in after["stats"]
