"""Training through the REST API, end to end, with real processes on loopback.

Redis: a `promptserve serve` process and a separate `promptserve worker` process share one Redis
store; a job submitted over HTTP shows progress while it runs, its checkpoint is then served by
the same, never restarted, service and scores there what the trainer reported; cancel stops a
running job and a killed worker fails its job, and neither publishes anything.

The embedded file store: no Redis at all; the service runs the job in a child process of its own.
"""

from __future__ import annotations

import base64
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import Served, colour_items, env_for, save_weights, start_worker, stop
from tests.redis_server import RedisServer, _start_server

ADMIN = {"Authorization": "Bearer admin-e2e"}
READ = {"Authorization": "Bearer read-e2e"}
KEYS = {"api_keys": "read-e2e", "admin_keys": "admin-e2e"}


def job_body(name: str, epochs: int, per_class: int = 4, seed: int = 0) -> dict[str, Any]:
    return {
        "name": name,
        "method": "coop",
        "method_config": {"n_ctx": 4},
        "dataset": {
            "kind": "upload",
            "images": colour_items(per_class, seed=seed),
            "test_images": colour_items(3, seed=seed + 1),
        },
        "recipe": {"epochs": epochs, "batch_size": 4, "warmup_epochs": 0, "lr": 0.05},
    }


def poll(
    url: str, job_id: str, done: Callable[[dict[str, Any]], bool], timeout: float = 120.0
) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{url}/v1/jobs/{job_id}", headers=READ, timeout=10)
        assert r.status_code == 200, r.text
        seen.append(r.json())
        if done(seen[-1]):
            return seen
        assert time.monotonic() < deadline, f"gave up waiting; last status {seen[-1]}"
        time.sleep(0.1)


def versions(url: str, name: str) -> int:
    r = httpx.get(f"{url}/v1/checkpoints", headers=READ, timeout=10)
    assert r.status_code == 200, r.text
    return sum(1 for c in r.json()["checkpoints"] if c["name"] == name)


def served_accuracy(url: str, checkpoint: str, items: list[dict[str, str]]) -> float:
    r = httpx.post(
        f"{url}/v1/classify",
        json={"checkpoint": checkpoint, "images": [i["image"] for i in items], "top_k": 1},
        headers=READ,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    preds = r.json()["results"][0]["predictions"]
    return sum(p[0]["label"] == i["label"] for p, i in zip(preds, items, strict=True)) / len(items)


@pytest.fixture(scope="module")
def weights(backbone, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_weights(backbone, tmp_path_factory.mktemp("weights") / "tiny.safetensors")


@pytest.fixture(scope="module")
def redis_stack(weights, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """redis-server + `promptserve serve` + `promptserve worker`, all on one redis:// store."""
    base = tmp_path_factory.mktemp("e2e")
    (base / "redis").mkdir()
    server: RedisServer = _start_server(base / "redis")
    env = env_for(weights, server.url, **KEYS)
    worker = start_worker(env, base / "worker.log")
    api = Served(env, base / "serve.log").wait_ready()
    yield {"api": api, "worker": worker, "base": base, "env": env}
    api.stop()
    stop(worker)
    server.kill()


def test_a_job_through_the_api_is_trained_by_a_worker_and_served_without_restart(redis_stack):
    api: Served = redis_stack["api"]
    pid = api.proc.pid
    body = job_body("colours", epochs=12)
    r = httpx.post(f"{api.url}/v1/jobs", json=body, headers=READ, timeout=30)
    assert r.status_code == 403  # submitting is an admin's
    r = httpx.post(f"{api.url}/v1/jobs", json=body, headers=ADMIN, timeout=30)
    assert r.status_code == 202, r.text
    seen = poll(api.url, r.json()["id"], lambda s: s["state"] in ("finished", "failed"))
    running = [s["progress"] for s in seen if s["state"] == "started" and "progress" in s]
    assert running, "no progress was visible while the job ran"
    assert all(p["epochs"] == 12 and p["step"] >= 1 for p in running)
    assert any("eta_s" in p for p in running), "no ETA once the first epoch had ended"
    out = seen[-1]
    assert out["state"] == "finished", out
    assert out["result"]["name"] == "colours" and out["result"]["version"] == 1
    reported = out["result"]["metrics"]["test_accuracy"]
    # the running service picked the new checkpoint up from the store's events: no restart
    assert api.proc.poll() is None and api.proc.pid == pid
    served = served_accuracy(api.url, "colours", body["dataset"]["test_images"])
    assert served == pytest.approx(reported, abs=5e-5)  # the manifest rounds to 4 places
    r = httpx.get(f"{api.url}/v1/checkpoints/colours", headers=READ, timeout=10)
    assert r.status_code == 200 and r.json()["version"] == 1, r.text


def test_cancel_through_the_api_stops_the_run_and_publishes_nothing(redis_stack):
    api: Served = redis_stack["api"]
    r = httpx.post(
        f"{api.url}/v1/jobs", json=job_body("to-cancel", epochs=500), headers=ADMIN, timeout=30
    )
    job_id = r.json()["id"]
    poll(api.url, job_id, lambda s: s["state"] == "started" and "progress" in s)
    r = httpx.delete(f"{api.url}/v1/jobs/{job_id}", headers=ADMIN, timeout=10)
    assert r.status_code in (200, 202), r.text
    out = poll(api.url, job_id, lambda s: s["state"] != "started", timeout=30)[-1]
    assert out["state"] == "cancelled" and out["progress"]["epoch"] < 500
    assert versions(api.url, "to-cancel") == 0


def test_a_killed_worker_fails_its_job_and_publishes_nothing(redis_stack):
    api: Served = redis_stack["api"]
    r = httpx.post(
        f"{api.url}/v1/jobs", json=job_body("to-kill", epochs=500), headers=ADMIN, timeout=30
    )
    job_id = r.json()["id"]
    poll(api.url, job_id, lambda s: s["state"] == "started" and "progress" in s)
    redis_stack["worker"].send_signal(signal.SIGKILL)
    redis_stack["worker"].wait()
    out = poll(api.url, job_id, lambda s: s["state"] != "started", timeout=30)[-1]
    assert out["state"] == "failed" and out["error"]["code"] == "worker_lost", out
    assert versions(api.url, "to-kill") == 0


def test_bad_uploads_are_refused_before_anything_is_queued(redis_stack):
    api: Served = redis_stack["api"]
    body = job_body("bad-upload", epochs=1)
    body["dataset"]["images"][3]["image"] = base64.b64encode(b"GIF89a not allowed").decode()
    r = httpx.post(f"{api.url}/v1/jobs", json=body, headers=ADMIN, timeout=30)
    assert r.status_code == 415 and "image 3" in r.json()["error"]["message"], r.text
    body = job_body("bad-upload", epochs=1)
    body["dataset"]["images"] = body["dataset"]["images"][:4]  # one class only
    r = httpx.post(f"{api.url}/v1/jobs", json=body, headers=ADMIN, timeout=30)
    assert r.status_code == 400 and "2 classes" in r.json()["error"]["message"], r.text
    body = job_body("bad-upload", epochs=1)
    body["dataset"]["test_images"][0]["label"] = "purple"
    r = httpx.post(f"{api.url}/v1/jobs", json=body, headers=ADMIN, timeout=30)
    assert r.status_code == 400 and "purple" in r.json()["error"]["message"], r.text


# --- the embedded file store: the service trains by itself ---------------------------------------


def test_with_the_file_store_the_service_trains_in_its_own_child_process(weights, tmp_path):
    env = env_for(weights, f"file://{tmp_path / 'store'}", runs_dir=str(tmp_path / "runs"), **KEYS)
    api = Served(env, tmp_path / "serve.log").wait_ready()
    try:
        body = job_body("local", epochs=6)
        r = httpx.post(f"{api.url}/v1/jobs", json=body, headers=ADMIN, timeout=30)
        assert r.status_code == 202, r.text
        seen = poll(api.url, r.json()["id"], lambda s: s["state"] in ("finished", "failed"))
        assert any(s["state"] == "started" and "progress" in s for s in seen)
        out = seen[-1]
        assert out["state"] == "finished", (out, api.tail())
        reported = out["result"]["metrics"]["test_accuracy"]
        served = served_accuracy(api.url, "local", body["dataset"]["test_images"])
        assert served == pytest.approx(reported, abs=5e-5)  # the manifest rounds to 4 places
        assert (tmp_path / "runs" / "local-v1" / "curves.png").stat().st_size > 0
    finally:
        api.stop()
