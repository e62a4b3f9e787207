"""Screenshots of every console screen, on the demo's data, into docs/console/.

    .venv/bin/python bench/console_screenshots.py            # about 5 minutes on 2 cores, once
    .venv/bin/python bench/console_screenshots.py --out /tmp/shots

It prepares what `make demo` prepares (the proving-ground CLIP, its three checkpoints, example
images with their true labels; reused from var/console-shots/ when present), serves it on
loopback with a read and an admin key, trains one more version through the console's own form,
sends some traffic, and photographs each screen in Debian's chromium at laptop and phone sizes.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import free_port
from tests.ui.conftest import CHROMIUM, CHROMIUM_ARGS

ADMIN, READ = "console-admin", "console-read"
LAPTOP = {"width": 1360, "height": 900}
PHONE = {"width": 390, "height": 844}
# A short run of the demo's recipe (8 shots a class): curves of ~64 points in a minute or two.
RECIPE = {"epochs": 8, "optimizer": "adamw", "lr": 0.03, "warmup_epochs": 0, "batch_size": 32}


def serve(root: Path) -> tuple[str, threading.Thread]:
    import uvicorn

    from service.app import create_app
    from service.demo import prepare

    port = free_port()
    demo = prepare(f"file://{root / 'store'}", port, root=root)
    settings = demo.settings.model_copy(update={"api_keys": READ, "admin_keys": ADMIN})
    app = create_app(settings, backbone=demo.backbone)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return url, thread
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the service did not become ready")


def demo_checkpoints() -> list[tuple[str, str, str]]:
    """(name, method, domain) of the demo's checkpoints, whatever the demo trains today."""
    from service.demo import DEMO_CHECKPOINTS

    return [(c[0], c[1], c[2]) for c in DEMO_CHECKPOINTS]


def traffic(url: str, images: Path, seconds: float) -> None:
    """Classify requests, as clients would send them, for `seconds`, at a rate that varies (so the
    Service screen's rate chart has a shape): bursts of growing batches, then a pause."""
    pics = [base64.b64encode(p.read_bytes()).decode() for p in sorted(images.glob("*.png"))]
    end = time.monotonic() + seconds
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {READ}"}) as client:
        i = 0
        while time.monotonic() < end:
            for ckpt, _, _ in demo_checkpoints():
                client.post("/v1/classify", json={"checkpoint": ckpt, "images": pics[: 1 + i % 6]})
            i += 1
            time.sleep(0.02 * (i % 10))


def snap(page: Any, path: Path, full_page: bool = True) -> None:
    """A screenshot from the top of the page, once the toasts have gone."""
    from playwright.sync_api import expect

    expect(page.locator(".toast")).to_have_count(0)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(path), full_page=full_page)


def shoot(url: str, out: Path, images: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=180_000)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport=LAPTOP, color_scheme="light",
        )  # fmt: skip
        page = ctx.new_page()
        page.goto(f"{url}/")
        page.get_by_label("API key").fill(ADMIN)
        page.get_by_role("button", name="Use key").click()
        expect(page.locator("#auth-badge")).to_have_text("Admin key")

        # Classify: as the console opens on the demo (one domain's examples, a checkpoint for
        # it, zero-shot beside it), plus the other checkpoint of that domain when there is one.
        first = page.get_by_label("Checkpoint", exact=True)
        expect(first).not_to_have_value("")
        chosen = first.input_value()
        domain = next(d for n, _, d in demo_checkpoints() if n == chosen)
        other = [n for n, _, d in demo_checkpoints() if d == domain and n != chosen]
        if other:
            page.get_by_role("button", name="+ Compare with another checkpoint or version").click()
            second = page.get_by_label("Compare with")
            second.fill(other[0])
            second.dispatch_event("change")
        page.get_by_role("button", name="Classify", exact=True).click()
        expect(page.locator(".result").first).to_be_visible()
        snap(page, out / "classify.png")

        # Training: a new version of a demo checkpoint through the form, watched to its end.
        name, method, domain = demo_checkpoints()[0]
        page.goto(f"{url}/ui/#/training")
        page.get_by_label("Checkpoint name").fill(name)
        page.get_by_label("Method", exact=True).select_option(method)
        page.get_by_label("Domain").select_option(domain)
        page.get_by_label("Shots per class").fill("8")
        page.get_by_label("Recipe overrides (JSON)").fill(json.dumps(RECIPE))
        page.get_by_label("Make the result live when it finishes").uncheck()
        page.get_by_role("button", name="Start training").click()
        expect(page.locator(".job-state")).to_have_text("started")
        # a few points on the curve (the page's CSP forbids string eval: no wait_for_function)
        expect(page.locator("svg.chart polyline").first).to_have_attribute(
            "points", re.compile(r"^\S+(\s+\S+){3,}$")
        )
        snap(page, out / "training-running.png")
        expect(page.locator(".job-state")).to_have_text("finished", timeout=900_000)
        snap(page, out / "training.png")

        # Checkpoints: the two versions, one opened to its manifest and evaluation.
        page.goto(f"{url}/ui/#/checkpoints/{name}")
        page.get_by_role("button", name="Details").nth(1).click()
        expect(page.locator(".version-detail .kv").first).to_be_visible()
        snap(page, out / "checkpoints.png")

        # Upload: a bad file and the API's own error, verbatim.
        bad = Path(profile) / "eurosat.pth"
        bad.write_bytes(b"PK\x03\x04 a pickled torch file, not safetensors")
        page.get_by_label("Checkpoint file (.safetensors)").set_input_files(str(bad))
        page.get_by_role("button", name="Upload").click()
        expect(page.locator(".error-message")).to_be_visible()
        page.locator("form").filter(has_text="Upload a checkpoint").screenshot(
            path=str(out / "upload-error.png")
        )

        # Service: traffic from a client in the background while the page polls /metrics.
        page.goto(f"{url}/ui/#/service")
        sender = threading.Thread(target=traffic, args=(url, images, 20.0))
        sender.start()
        sender.join()
        # the rate chart gains a point a poll (2 s): the traffic's ten or so, then one at rest
        expect(page.locator("svg.chart polyline").first).to_have_attribute(
            "points", re.compile(r"^\S+(\s+\S+){9,}$")
        )
        snap(page, out / "service.png")

        # A read key: the same screens without a single admin action.
        reader = ctx.new_page()
        reader.goto(f"{url}/ui/#/checkpoints/{name}")
        reader.get_by_label("API key").fill(READ)
        reader.get_by_role("button", name="Use key").click()
        expect(reader.locator(".live-version")).to_be_visible()
        snap(reader, out / "read-key.png")
        reader.close()

        # A phone.
        phone = ctx.new_page()
        phone.set_viewport_size(PHONE)
        phone.goto(f"{url}/ui/#/classify")
        phone.get_by_label("API key").fill(ADMIN)
        phone.get_by_role("button", name="Use key").click()
        phone.get_by_role("button", name="Classify", exact=True).click()
        expect(phone.locator(".result").first).to_be_visible()
        phone.locator(".result").first.scroll_into_view_if_needed()
        expect(phone.locator(".toast")).to_have_count(0)
        phone.screenshot(path=str(out / "phone-classify.png"))
        phone.goto(f"{url}/ui/#/checkpoints/{name}")
        expect(phone.locator(".live-version")).to_be_visible()
        expect(phone.locator(".toast")).to_have_count(0)
        # the end of the list and the opened checkpoint under it
        phone.evaluate(
            "window.scrollTo(0, document.querySelector('.live-version').getBoundingClientRect()"
            ".top + window.scrollY - 320)"
        )
        phone.screenshot(path=str(out / "phone-checkpoints.png"))
        ctx.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/console"))
    parser.add_argument("--root", type=Path, default=Path("var/console-shots"))
    args = parser.parse_args()
    url, _ = serve(args.root)
    shoot(url, args.out, args.root / "images")
    for png in sorted(args.out.glob("*.png")):
        print(f"{png}  {png.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
