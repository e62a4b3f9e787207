"""The console's other ways in: an image dropped on the page (not picked), and every screen at a
phone's width with nothing wider than the screen (a page that scrolls sideways is unreadable)
and every control named for a screen reader."""

from __future__ import annotations

import base64
import re

import pytest
from playwright.sync_api import expect

from tests.procs import COLOURS, png
from tests.ui.conftest import ADMIN, READ, classify

PHONE = {"width": 390, "height": 844}  # a common phone's CSS viewport


def test_an_image_dropped_on_the_page_is_classified(server, new_page):
    server.upload("dropped")
    data = png(COLOURS["green"], seed=5, size=40)
    b64 = base64.b64encode(data).decode()
    want = server.api.post(
        "/v1/classify", json={"checkpoint": "dropped", "images": [b64], "top_k": 3}
    ).json()["results"][0]["predictions"][0]
    page = new_page(server.url, READ)
    page.get_by_role("button", name="Clear all").click()  # the examples are preloaded
    # What a file manager's drag hands the page: a DataTransfer holding the file.
    transfer = page.evaluate_handle(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const t = new DataTransfer();
            t.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            return t;
        }""",
        b64,
    )
    page.dispatch_event(".drop", "dragover", {"dataTransfer": transfer})
    page.dispatch_event(".drop", "drop", {"dataTransfer": transfer})
    expect(page.locator(".thumb img[alt='dropped.png']")).to_be_visible()
    page.get_by_label("Checkpoint", exact=True).fill("dropped")
    page.get_by_label("Checkpoint", exact=True).dispatch_event("change")
    page.get_by_label(re.compile("^Zero-shot beside it")).uncheck()
    classify(page)
    answer = page.get_by_role("article", name="Results for dropped.png").locator(".answer")
    expect(answer).to_have_count(1)
    expect(answer.locator(".bar-label > span:first-child")).to_have_text([p["label"] for p in want])


# Every visible control of the screen must have a name a screen reader can say: a <label>, an
# aria-label or aria-labelledby, or (buttons, links) its text. Returns the outerHTML of those that
# have none.
UNNAMED = """() => [...document.querySelectorAll(
    "#main input, #main select, #main textarea, #main button, #main a[href], header button")]
  .filter((el) => el.getClientRects().length && el.type !== "hidden")
  .filter((el) => {
    const aria = el.getAttribute("aria-label") || el.getAttribute("aria-labelledby");
    const labelled = el.labels && [...el.labels].some((l) => l.textContent.trim());
    const text = ["BUTTON", "A"].includes(el.tagName) && el.textContent.trim();
    return !(aria || labelled || text);
  })
  .map((el) => el.outerHTML.slice(0, 160))"""


def _no_sideways_scroll(page) -> None:
    widths = page.evaluate(
        "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    assert widths[0] <= widths[1], f"the page is {widths[0]}px wide on a {widths[1]}px screen"


@pytest.mark.parametrize(
    "screen,ready",
    [
        ("classify", ".result"),  # after a classification: images beside their bars
        ("checkpoints/phone", ".live-version"),  # the versions table of one checkpoint
        ("training", "#main form"),
        ("service", ".runtime"),
    ],
)
def test_every_screen_fits_a_phone(server, new_page, screen, ready):
    if server.api.get("/v1/checkpoints/phone").status_code == 404:
        server.upload("phone", seed=1)
        server.upload("phone", seed=2)
    page = new_page(server.url, ADMIN)
    page.set_viewport_size(PHONE)
    if screen == "classify":
        page.get_by_label("Checkpoint", exact=True).fill("phone")
        page.get_by_label("Checkpoint", exact=True).dispatch_event("change")
        expect(page.locator(".thumbs .thumb img").first).to_be_visible()
        classify(page)
    else:
        page.goto(f"{server.url}/ui/#/{screen}")
    expect(page.locator(ready).first).to_be_visible()
    _no_sideways_scroll(page)
    assert page.evaluate(UNNAMED) == [], "controls a screen reader cannot name"
    # the sections stay reachable: every tab is on screen, none cut off at the edge
    for tab in page.locator(".tabs a").all():
        box = tab.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
