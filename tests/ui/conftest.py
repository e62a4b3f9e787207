"""The console in a real browser: Debian's chromium driven by Playwright, against a real
`promptserve serve` process on loopback (the tiny CLIP from a weights file, a file store, its own
training child). Playwright's own browser download is not used: `executable_path` points at the
system chromium that `make system-deps` installs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.engine.test_residency import checkpoint
from tests.procs import COLOURS, Served, env_for, png, save_weights

CHROMIUM = "/usr/bin/chromium"
# As the issue asks; Playwright adds --headless itself and gives each context a fresh
# --user-data-dir (launch_persistent_context on a new temporary folder).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ADMIN, READ = "ui-admin-key-1", "ui-read-key-2"
# Waits are for a condition, never a sleep; the bound is generous for a busy two-core machine.
expect.set_options(timeout=20_000)


def example_images(folder: Path) -> Path:
    """Two labelled example images, as the demo writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = {}
    for i, colour in enumerate(("red", "blue")):
        (folder / f"{colour}.png").write_bytes(png(COLOURS[colour], seed=i, size=48))
        labels[f"{colour}.png"] = "cat" if colour == "red" else "dog"
    (folder / "labels.json").write_text(json.dumps(labels))
    return folder


class Server:
    """A served app plus an httpx client holding the admin key, to set the scene and to check
    what the page shows against what the API says."""

    def __init__(self, served: Served, backbone: Any) -> None:
        self.served, self.url, self.backbone = served, served.url, backbone
        self.api = httpx.Client(
            base_url=served.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30
        )

    def upload(self, name: str, seed: int = 0, activate: bool = True) -> dict[str, Any]:
        blob = checkpoint(self.backbone, name=name, seed=seed)
        r = self.api.post(
            "/v1/checkpoints",
            files={"file": (f"{name}.safetensors", blob)},
            data={"activate": str(activate).lower()},
        )
        assert r.status_code == 201, r.text
        return dict(r.json())


def _serve(base: Path, backbone: Any, **settings: str) -> Iterator[Server]:
    weights = save_weights(backbone, base / "tiny.safetensors")
    env = env_for(weights, f"file://{base / 'store'}", runs_dir=str(base / "runs"), **settings)
    served = Served(env, base / "serve.log").wait_ready()
    server = Server(served, backbone)
    yield server
    server.api.close()
    served.stop()


@pytest.fixture(scope="module")
def server(backbone, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Auth on (a read and an admin key), two example images configured."""
    base = tmp_path_factory.mktemp("ui")
    examples = example_images(base / "examples")
    yield from _serve(base, backbone, api_keys=READ, admin_keys=ADMIN, examples_dir=str(examples))


@pytest.fixture(scope="module")
def open_server(backbone, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """No keys at all: loopback only, everyone is an admin."""
    yield from _serve(tmp_path_factory.mktemp("ui-open"), backbone)


@pytest.fixture(scope="session")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make system-deps` (Debian's chromium package)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 860},
        )
        context.set_default_timeout(30_000)
        yield context
        context.close()


@pytest.fixture
def new_page(browser_context) -> Iterator[Callable[..., Any]]:
    """Pages in a fresh tab (so a fresh sessionStorage); fails the test on any script error and
    on any request that leaves the service's origin (the console works offline: no CDN)."""
    pages: list[Any] = []
    problems: list[str] = []

    def make(url: str, key: str | None = None) -> Any:
        page = browser_context.new_page()
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on(
            "request",
            lambda r: (
                None
                if r.url.startswith((f"{url}/", "blob:", "data:"))
                else problems.append(f"request to another origin: {r.url}")
            ),
        )
        page.on(
            "console",
            lambda msg: (
                problems.append(f"console {msg.type}: {msg.text}")
                if msg.type == "error" and "the server responded with a status of" not in msg.text
                else None
            ),
        )
        pages.append(page)
        page.goto(f"{url}/")
        if key is not None:
            sign_in(page, key)
        return page

    yield make
    for page in pages:
        page.close()
    assert not problems, problems


def sign_in(page: Any, key: str) -> None:
    """Type the key into the page, as a person would."""
    # The shell opens the key panel itself once it knows a key is needed: wait until it has
    # decided, or a click on the badge would race it and close the panel again.
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    panel = page.locator("#auth-panel")
    if not panel.is_visible():
        page.get_by_role("button", name="No key").click()
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#auth-badge")).to_have_text(
        "Admin key" if key == ADMIN else "Read-only key"
    )


def classify(page: Any) -> Any:
    """Press Classify and wait for its answer; fail with the API's error (the page shows it as
    an alert) and the request's body when it is one. Returns the results section."""
    bodies: list[str] = []

    def sent(request: Any) -> None:
        if request.url.endswith("/v1/classify"):
            bodies.append((request.post_data or "")[:400])

    page.on("request", sent)
    page.get_by_role("button", name="Classify", exact=True).click()
    results = page.locator("section[aria-labelledby='res-h']")
    expect(results.locator(".result, [role='alert']").first).to_be_visible()
    alert = results.get_by_role("alert")
    assert alert.count() == 0, (alert.inner_text(), bodies)
    page.remove_listener("request", sent)
    return results
