"""The console's Training and Service screens in chromium: a real training job run by the
server's own training process, and the service figures checked against /metrics and /readyz."""

from __future__ import annotations

import base64
import json
import re

from playwright.sync_api import expect

from tests.procs import COLOURS, png
from tests.ui.conftest import ADMIN, READ

# Seconds on two CPU cores with the tiny CLIP: two shots of 32 classes, three short epochs.
TINY_RECIPE = {"epochs": 3, "batch_size": 16, "optimizer": "adamw", "lr": 0.03, "warmup_epochs": 0}


def test_watch_a_short_proving_ground_job_reach_its_end(server, new_page):
    page = new_page(server.url, ADMIN)
    page.goto(f"{server.url}/ui/#/training")
    page.get_by_label("Checkpoint name").fill("ui-trained")
    page.get_by_label("Method", exact=True).select_option("coop")
    page.get_by_label("Dataset", exact=True).select_option("proving_ground")
    page.get_by_label("Domain").select_option("gray")
    page.get_by_label("Shots per class").fill("2")
    page.get_by_label("Recipe overrides (JSON)").fill(json.dumps(TINY_RECIPE))
    page.get_by_label("Method config (JSON)").fill('{"n_ctx": 4}')
    page.get_by_role("button", name="Start training").click()

    expect(page).to_have_url(re.compile(r"#/training/[0-9a-f]{32}$"))
    job_id = page.url.rsplit("/", 1)[1]
    state = page.locator(".job-state")
    expect(state).to_have_text(re.compile("queued|started|finished"))
    expect(state).to_have_text("finished", timeout=240_000)

    job = server.api.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "finished" and len(job["history"]) >= TINY_RECIPE["epochs"]
    # the curves are drawn from the job's history: one vertex per point, the last at its step
    loss = page.locator("svg.chart").first
    points = loss.locator("polyline").get_attribute("points")
    assert points is not None and len(points.split()) == len(job["history"])
    expect(loss).to_have_attribute(
        "aria-label", re.compile(rf"latest .* at step {job['history'][-1]['step']}$")
    )
    expect(page.locator(".success")).to_contain_text("test_accuracy")

    page.get_by_role("link", name="Open ui-trained v1").click()
    expect(page).to_have_url(re.compile(r"#/checkpoints/ui-trained$"))
    expect(page.locator(".live-version")).to_have_text("live v1")


def test_cancel_a_job_from_the_page(server, new_page):
    r = server.api.post(
        "/v1/jobs",
        json={"name": "ui-cancelled", "method": "coop", "method_config": {"n_ctx": 4},
              "dataset": {"kind": "proving_ground", "domain": "gray"}, "shots": 2,
              "recipe": {**TINY_RECIPE, "epochs": 10_000}},
    )  # fmt: skip
    assert r.status_code == 202, r.text
    page = new_page(server.url, ADMIN)
    page.goto(f"{server.url}/ui/#/training/{r.json()['id']}")
    expect(page.locator(".job-state")).to_have_text(re.compile("queued|started"))
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator(".job-state")).to_have_text("cancelled", timeout=120_000)
    assert server.api.get("/v1/checkpoints/ui-cancelled").status_code == 404  # nothing published


def _metric_sum(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _buckets(text: str, name: str) -> list[int]:
    """Per-bucket counts of a histogram (summed over its other labels), from its cumulative
    `le` buckets in the order they are exposed."""
    cumulative: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            le = re.search(r'le="([^"]+)"', line)
            assert le is not None
            cumulative[le[1]] = cumulative.get(le[1], 0.0) + float(line.split()[-1])
    counts = [int(v) for v in cumulative.values()]
    return [b - a for a, b in zip([0, *counts], counts, strict=False)]


def test_service_screen_shows_the_numbers_of_metrics_and_readyz(server, new_page):
    server.upload("served")
    image = base64.b64encode(png(COLOURS["red"], seed=9)).decode()
    for _ in range(3):
        r = server.api.post("/v1/classify", json={"checkpoint": "served", "images": [image]})
        assert r.status_code == 200
    metrics = server.api.get("/metrics").text
    served = int(_metric_sum(metrics, "promptserve_request_seconds_count"))
    ready = server.api.get("/readyz").json()

    page = new_page(server.url, READ)
    page.goto(f"{server.url}/ui/#/service")
    expect(page.locator(".stat.requests .value")).to_have_text(f"{served:,}")
    expect(page.locator(".runtime")).to_have_text(ready["runtime"])
    expect(page.locator(".runtime-reason")).to_have_text(ready["runtime_reason"])
    resident = page.get_by_role("link", name="served", exact=True)
    expect(resident).to_be_visible()
    # the distributions are /metrics' histograms, bucket by bucket
    batches = _buckets(metrics, "promptserve_batch_images_bucket")
    lat = page.get_by_role("table", name="request latency").locator(".n")
    expect(lat).to_have_text(
        [f"{n:,}" for n in _buckets(metrics, "promptserve_request_seconds_bucket")]
    )
    sizes = page.get_by_role("table", name="batch size").locator(".n")
    expect(sizes).to_have_text([f"{n:,}" for n in batches])
    assert sum(batches) == int(_metric_sum(metrics, "promptserve_batch_images_count")) >= 3
    # the rate is over the last polling interval: it settles to 0 with no traffic
    expect(page.locator(".stat.rate .value")).to_have_text("0.0", timeout=15_000)
