"""Scale-out on loopback: two `promptserve serve` replicas and one `promptserve worker` (the real
command line, separate processes) on one redis-server, as the compose stack and the Kubernetes
manifests run them.

Every process loads the tiny CLIP from the same weights file, so all share one fingerprint.
One test walks the story in order, because each step needs the state the last one left and
starting the processes is most of the cost:

1. a checkpoint uploaded through replica A is served by replica B within 1 s, and a new version
   uploaded through A replaces the one B holds within 1 s (the store's events, no polling);
2. A is killed (SIGKILL) while a client sends requests to both: every request sent to B succeeds;
3. a job submitted through B is run by the worker, and A, restarted, serves its checkpoint.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import CLASSNAMES
from tests.engine.test_residency import checkpoint
from tests.procs import COLOURS, Served, env_for, png, save_weights, start_worker, stop
from tests.redis_server import RedisServer, _start_server

ADMIN = {"Authorization": "Bearer admin-replicas"}
READ = {"Authorization": "Bearer read-replicas"}
# TEST_DEVICE=cuda:0 runs every process on the GPU, as the compose stack and manifests do
DEVICE = os.environ.get("TEST_DEVICE", "cpu")
KEYS = {
    "api_keys": "read-replicas",
    "admin_keys": "admin-replicas",
    "log_format": "json",
    "device": DEVICE,
}
IMAGE = base64.b64encode(png((200, 30, 30), seed=1)).decode()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = _start_server(workdir)
    yield server
    server.kill()


def classify(url: str, name: str, timeout: float = 10.0) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/classify",
        json={"checkpoint": name, "images": [IMAGE], "top_k": 1},
        headers=READ,
        timeout=timeout,
    )


def upload(url: str, blob: bytes) -> dict[str, Any]:
    r = httpx.post(
        f"{url}/v1/checkpoints", files={"file": ("c.safetensors", blob)}, headers=ADMIN, timeout=30
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def served_version(url: str, name: str) -> int | None:
    r = classify(url, name)
    return int(r.json()["results"][0]["version"]) if r.status_code == 200 else None


def wait_for_version(url: str, name: str, version: int, within: float) -> float:
    """Seconds until `url` serves `name` at `version`; fails after `within` seconds."""
    start = time.monotonic()
    while (seen := served_version(url, name)) != version:
        assert time.monotonic() - start < within, f"{url} still serves {name} v{seen}"
        time.sleep(0.02)
    return time.monotonic() - start


def image_folder(root: Path, per_class: int = 4) -> Path:
    """A tiny ImageFolder dataset: one folder of PNGs per colour."""
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(png(rgb, seed=i))
    return root


def test_replicas_share_one_store(backbone, redis: RedisServer, tmp_path: Path) -> None:
    weights = save_weights(backbone, tmp_path / "tiny.safetensors")
    env = env_for(weights, redis.url, **KEYS)
    a = Served(env, tmp_path / "a.log")
    b = Served(env, tmp_path / "b.log")
    worker = start_worker(env, tmp_path / "worker.log")
    procs = [a, b]
    try:
        a.wait_ready()
        b.wait_ready()
        ready = [httpx.get(f"{s.url}/readyz", headers=READ).json() for s in (a, b)]
        assert {r["fingerprint"] for r in ready} == {backbone.fingerprint}
        assert {r["device"] for r in ready} == {DEVICE}

        # 1. uploaded through A, served by B within 1 s; then a new version swaps in on B
        up = upload(a.url, checkpoint(backbone, name="pets", seed=0, classnames=CLASSNAMES))
        assert up == {"name": "pets", "version": 1, "method": "coop", "active": True}
        assert wait_for_version(b.url, "pets", 1, within=1.0) < 1.0
        upload(a.url, checkpoint(backbone, name="pets", seed=1, classnames=CLASSNAMES))
        assert wait_for_version(b.url, "pets", 2, within=1.0) < 1.0

        # the logs: JSON lines, the start-up line, the request id the client got back
        r = httpx.post(
            f"{b.url}/v1/classify",
            json={"checkpoint": "pets", "images": [IMAGE]},
            headers={**READ, "X-Request-ID": "trace-b-1"},
        )
        assert r.headers["x-request-id"] == "trace-b-1"
        b_lines = [json.loads(x) for x in b.log.read_text().splitlines() if x.startswith("{")]
        ready = next(x for x in b_lines if x["msg"].startswith("ready:"))
        assert ready["auth"] == "keys" and ready["store"] == redis.url
        assert any(
            x.get("request_id") == "trace-b-1" and x.get("status") == 200 for x in b_lines
        ), b.tail()

        # 2. A dies mid-traffic; every request to B still succeeds
        results: dict[str, list[tuple[float, int | None]]] = {a.url: [], b.url: []}
        killed_at: list[float] = []
        stop_traffic = threading.Event()

        def traffic(url: str) -> None:
            with httpx.Client(timeout=10) as client:
                while not stop_traffic.is_set():
                    sent = time.monotonic()
                    try:
                        r = client.post(
                            f"{url}/v1/classify",
                            json={"checkpoint": "pets", "images": [IMAGE]},
                            headers=READ,
                        )
                        results[url].append((sent, r.status_code))
                    except httpx.HTTPError:
                        results[url].append((sent, None))
                        time.sleep(0.01)  # a dead replica refuses at once; do not spin

        threads = [threading.Thread(target=traffic, args=(s.url,)) for s in (a, b)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        a.stop(signal.SIGKILL)
        killed_at.append(time.monotonic())
        time.sleep(1.0)
        stop_traffic.set()
        for t in threads:
            t.join()
        to_b = results[b.url]
        assert [status for _, status in to_b] == [200] * len(to_b), to_b
        assert sum(1 for sent, _ in to_b if sent > killed_at[0]) >= 3, "B was asked after A died"
        after = [status for sent, status in results[a.url] if sent > killed_at[0]]
        assert after and all(s is None for s in after), "A really was dead during the traffic"

        # 3. a job through B, run by the worker; A restarted (same port) serves its checkpoint
        data = image_folder(tmp_path / "colours")
        job = httpx.post(
            f"{b.url}/v1/jobs",
            json={
                "name": "colours",
                "method": "coop",
                "method_config": {"n_ctx": 4},
                "dataset": {"kind": "image_folder", "root": str(data)},
                "shots": None,
                "recipe": {"epochs": 2, "batch_size": 8, "warmup_epochs": 0, "lr": 0.05},
            },
            headers=ADMIN,
            timeout=10,
        )
        assert job.status_code == 202, job.text
        a = Served(env, tmp_path / "a2.log", port=a.port)  # restarts while the job runs
        procs.append(a)
        deadline = time.monotonic() + 60
        while (state := httpx.get(f"{b.url}/v1/jobs/{job.json()['id']}", headers=READ).json())[
            "state"
        ] not in ("finished", "failed"):
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
        assert state["state"] == "finished", state
        assert state["result"]["name"] == "colours"
        a.wait_ready()
        r = classify(a.url, "colours")
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        assert result["version"] == state["result"]["version"] == 1
        assert result["predictions"][0][0]["label"] in {n.replace("_", " ") for n in COLOURS}
    finally:
        for s in procs:
            s.stop(signal.SIGKILL)
        stop(worker)
