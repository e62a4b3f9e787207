"""The console end to end in chromium: what a person sees and clicks, checked against what the
API itself answers for the same request."""

from __future__ import annotations

import base64
import re

from playwright.sync_api import expect

from tests.procs import COLOURS, png
from tests.ui.conftest import ADMIN, READ, classify, sign_in


def test_root_leads_to_the_console_which_sends_the_key_only_as_a_bearer_header(server, new_page):
    page = new_page(server.url)
    assert page.url == f"{server.url}/ui/#/classify" or page.url.startswith(f"{server.url}/ui/")
    seen: list[tuple[str, str | None]] = []
    page.on("request", lambda r: seen.append((r.url, r.headers.get("authorization"))))
    sign_in(page, ADMIN)
    expect(page.get_by_role("heading", name="Classify", exact=True)).to_be_visible()
    api_calls = [(u, a) for u, a in seen if "/v1/" in u]
    assert api_calls and all(a == f"Bearer {ADMIN}" for _, a in api_calls), api_calls
    assert not any(ADMIN in u for u, _ in seen)  # never in a URL
    stored = page.evaluate("sessionStorage.getItem('promptserve.apiKey')")
    assert stored == ADMIN and page.evaluate("localStorage.length") == 0


def test_classify_an_image_end_to_end(server, new_page, tmp_path):
    server.upload("pets")
    image = tmp_path / "green.png"
    image.write_bytes(png(COLOURS["green"], seed=3, size=40))
    b64 = base64.b64encode(image.read_bytes()).decode()
    expected = server.api.post(
        "/v1/classify", json={"checkpoint": "pets", "images": [b64], "top_k": 3}
    ).json()["results"][0]
    classnames = server.api.get("/v1/checkpoints/pets").json()["classnames"]
    zero_shot = server.api.post(
        "/v1/classify", json={"classnames": classnames, "images": [b64], "top_k": 3}
    ).json()["results"][0]

    page = new_page(server.url, ADMIN)
    page.get_by_role("button", name="Clear all").click()  # the examples are preloaded
    page.get_by_label("Choose images").set_input_files(str(image))
    expect(page.locator(".thumb img[alt='green.png']")).to_be_visible()
    page.get_by_label("Checkpoint", exact=True).fill("pets")
    page.get_by_label("Checkpoint", exact=True).dispatch_event("change")
    page.get_by_label(re.compile("^Zero-shot beside it")).check()
    classify(page)

    result = page.get_by_role("article", name="Results for green.png")
    expect(result.locator(".answer")).to_have_count(2)
    for column, want in zip(result.locator(".answer").all(), (expected, zero_shot), strict=True):
        labels = column.locator(".bar-label > span:first-child").all_inner_texts()
        scores = column.locator(".bar-score").all_inner_texts()
        assert labels == [p["label"] for p in want["predictions"][0]]
        assert scores == [f"{100 * p['score']:.1f}%" for p in want["predictions"][0]]
    heads = result.get_by_role("heading", level=3)
    expect(heads.nth(0)).to_have_accessible_name(f"pets v{expected['version']} coop")
    expect(heads.nth(1)).to_have_accessible_name("zero-shot no prompt")
    expect(heads.nth(1).get_by_title("the class names of pets, no prompt")).to_be_visible()


def test_examples_and_two_versions_side_by_side(server, new_page):
    server.upload("compare", seed=1)
    server.upload("compare", seed=2)
    page = new_page(server.url, ADMIN)
    expect(page.locator(".thumbs .thumb img[alt^='red.png']")).to_be_visible()  # preloaded
    page.get_by_label("Checkpoint", exact=True).fill("compare")
    page.get_by_label("Checkpoint", exact=True).dispatch_event("change")
    page.get_by_label("Version").select_option("1")
    # labelled examples: the page opened with zero-shot beside the checkpoint; not wanted here
    expect(page.get_by_label(re.compile("^Zero-shot beside it"))).to_be_checked()
    page.get_by_label(re.compile("^Zero-shot beside it")).uncheck()
    page.get_by_role("button", name=re.compile("Compare with another")).click()
    page.get_by_role("combobox", name="Version").nth(1).select_option("2")
    classify(page)
    result = page.get_by_role("article", name="Results for red.png")
    expect(result.locator(".answer")).to_have_count(2)
    expect(result.locator(".answer h3").nth(0)).to_contain_text("v1")
    expect(result.locator(".answer h3").nth(1)).to_contain_text("v2")
    expect(result.locator(".truth")).to_have_text("true label: cat")  # from labels.json


def test_compare_an_old_version_with_the_live_one_from_its_checkpoint(server, new_page):
    server.upload("versus", seed=1)
    server.upload("versus", seed=2)  # v2 live
    page = new_page(server.url, READ)  # comparing is reading: a read key may
    page.goto(f"{server.url}/ui/#/checkpoints/versus")
    page.get_by_role("button", name="Compare v1 with the live v2").click()
    expect(page).to_have_url(re.compile("#/classify$"))
    expect(page.get_by_label("Checkpoint", exact=True)).to_have_value("versus")
    expect(page.get_by_label("Compare with")).to_have_value("versus")
    expect(page.get_by_label("Version").nth(0)).to_have_value("2")
    expect(page.get_by_label("Version").nth(1)).to_have_value("1")
    expect(page.get_by_label(re.compile("^Zero-shot beside it"))).not_to_be_checked()
    classify(page)
    heads = page.get_by_role("article", name="Results for red.png").locator(".answer h3")
    expect(heads).to_have_count(2)
    expect(heads.nth(0)).to_contain_text("v2")
    expect(heads.nth(1)).to_contain_text("v1")


def test_adhoc_classnames(server, new_page):
    page = new_page(server.url, READ)
    page.get_by_text("Ad-hoc classes").click()
    page.get_by_label("Class names, one per line").fill("red thing\nblue thing")
    classify(page)
    answer = page.get_by_role("article", name="Results for red.png").locator(".answer")
    expect(answer.locator("h3")).to_contain_text("zero-shot")
    expect(answer.locator(".bar-row")).to_have_count(2)


def test_upload_a_bad_file_shows_the_api_error_verbatim(server, new_page, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    api = server.api.post("/v1/checkpoints", files={"file": ("bad.safetensors", bad.read_bytes())})
    assert api.status_code == 422
    page = new_page(server.url, ADMIN)
    page.goto(f"{server.url}/ui/#/checkpoints")
    page.get_by_label("Checkpoint file (.safetensors)").set_input_files(str(bad))
    page.get_by_role("button", name="Upload").click()
    alert = page.get_by_role("alert")
    expect(alert.locator(".error-message")).to_have_text(api.json()["error"]["message"])
    expect(alert.locator(".error-code")).to_have_text(api.json()["error"]["code"])
    expect(alert.locator(".error-status")).to_have_text("422")


def test_activate_a_version_and_see_the_live_version_change_and_a_conflict(server, new_page):
    for seed in (1, 2, 3):
        server.upload("swap", seed=seed)  # v3 is live
    page = new_page(server.url, ADMIN)
    page.goto(f"{server.url}/ui/#/checkpoints/swap")
    live = page.locator(".live-version")
    expect(live).to_have_text("live v3")

    page.get_by_role("button", name="Roll back to v1").click()
    expect(live).to_have_text("live v1")
    assert server.api.get("/v1/checkpoints/swap").json()["version"] == 1
    expect(page.locator("tr[data-version='1']")).to_contain_text("live")

    # Someone else moves the pointer; the page still believes v1 is live: compare-and-set fails.
    assert server.api.post("/v1/checkpoints/swap/activate", json={"version": 2}).status_code == 200
    page.get_by_role("button", name="Activate to v3").click()
    alert = page.get_by_role("alert")
    expect(alert.locator(".error-status")).to_have_text("409")
    expect(alert.locator(".error-message")).to_contain_text("someone else changed it")
    assert server.api.get("/v1/checkpoints/swap").json()["version"] == 2  # nothing moved
    page.get_by_role("button", name="Reload the versions").click()
    expect(live).to_have_text("live v2")


def test_version_details_show_manifest_parameters_and_evaluation(server, new_page):
    server.upload("details")
    detail = server.api.get("/v1/checkpoints/details/versions/1").json()
    page = new_page(server.url, READ)
    page.goto(f"{server.url}/ui/#/checkpoints/details")
    page.get_by_role("button", name="Details").click()
    expect(page.locator(".version-detail")).to_contain_text(f"{detail['parameters']:,} in")
    expect(page.locator(".version-detail")).to_contain_text("coop")


def test_delete_asks_first(server, new_page):
    server.upload("doomed")
    page = new_page(server.url, ADMIN)
    page.goto(f"{server.url}/ui/#/checkpoints/doomed")
    page.get_by_role("button", name="Delete…").click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel").click()
    assert server.api.get("/v1/checkpoints/doomed").status_code == 200
    page.get_by_role("button", name="Delete…").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete doomed").click()
    expect(page.get_by_role("heading", name="All checkpoints")).to_be_visible()
    expect(page.get_by_role("link", name="doomed", exact=True)).to_have_count(0)
    assert server.api.get("/v1/checkpoints/doomed").status_code == 404


def test_search_and_paging_go_to_the_server(server, new_page):
    for i in range(28):
        server.upload(f"page-{i:02d}")
    page = new_page(server.url, READ)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if "/v1/checkpoints?" in r.url else None)
    page.goto(f"{server.url}/ui/#/checkpoints")
    page.get_by_label("Search").fill("page-")
    expect(page.locator(".pager")).to_contain_text("1–25 of 28")
    page.get_by_role("button", name="Next →").click()
    expect(page.locator(".pager")).to_contain_text("26–28 of 28")
    expect(page.get_by_role("link", name="page-27")).to_be_visible()
    assert any("q=page-" in u and "offset=25" in u and "limit=25" in u for u in requests)


def test_a_read_key_sees_no_admin_actions(server, new_page):
    server.upload("readonly", seed=1)
    server.upload("readonly", seed=2)
    page = new_page(server.url, READ)
    expect(page.locator("#auth-badge")).to_have_text("Read-only key")
    page.goto(f"{server.url}/ui/#/checkpoints/readonly")
    expect(page.locator(".live-version")).to_have_text("live v2")
    expect(page.get_by_role("button", name="Details")).to_have_count(2)
    for name in ("Upload", "Delete…", "Roll back to v1"):
        expect(page.get_by_role("button", name=name)).to_have_count(0)
    page.goto(f"{server.url}/ui/#/training")
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    expect(page.get_by_role("button", name="Start training")).to_have_count(0)


def test_without_a_key_the_page_asks_for_one(server, new_page):
    page = new_page(server.url)
    expect(page.locator("#auth-badge")).to_have_text("No key")
    expect(page.get_by_role("alert")).to_contain_text("An API key is needed")
    expect(page.get_by_label("API key")).to_be_focused()
    page.get_by_label("API key").fill("not-a-key")
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#auth-badge")).to_have_text("Key refused")
    expect(page.get_by_role("alert")).to_contain_text("unknown API key")


def test_with_auth_off_the_page_says_so(open_server, new_page):
    page = new_page(open_server.url)
    expect(page.locator("#auth-badge")).to_have_text("Auth off · loopback")
    page.goto(f"{open_server.url}/ui/#/service")
    expect(page.locator(".notice")).to_contain_text("Auth is off")
    page.goto(f"{open_server.url}/ui/#/checkpoints")  # everyone is an admin: the actions show
    expect(page.get_by_role("button", name="Upload")).to_be_visible()


def test_the_keyboard_alone_signs_in_navigates_and_cancels(server, new_page):
    server.upload("keyboard")
    page = new_page(server.url)
    expect(page.get_by_label("API key")).to_be_focused()  # the page asks for the key first
    page.keyboard.type(ADMIN)
    page.keyboard.press("Enter")
    expect(page.locator("#auth-badge")).to_have_text("Admin key")
    page.get_by_role("button", name="Admin key").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_label("API key")).to_be_focused()
    page.keyboard.press("Escape")
    expect(page.locator("#auth-panel")).to_be_hidden()
    expect(page.get_by_role("button", name="Admin key")).to_be_focused()

    page.goto(f"{server.url}/ui/#/checkpoints/keyboard")
    page.get_by_role("button", name="Delete…").focus()
    page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_role("button", name="Cancel")).to_be_focused()  # the safe choice
    page.keyboard.press("Escape")
    expect(dialog).to_have_count(0)
    assert server.api.get("/v1/checkpoints/keyboard").status_code == 200
