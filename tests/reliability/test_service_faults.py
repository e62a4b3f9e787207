"""Faults seen through the service, under load: what the user sees, and that nothing is lost.

The store-level faults (writer killed mid-write, disk full, corrupt blobs, Redis outage and
pub/sub loss) are in tests/prompts_store/test_store_faults.py; a worker killed mid-training in
tests/training/test_jobs.py; SIGTERM of a real server with requests in flight in
tests/api/test_server.py. Here the same faults hit a running app while clients classify."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from prompts_store import fsio, open_store
from service.app import create_app
from service.checkpoints.publish import publish
from service.settings import Settings
from tests.api.conftest import b64, make_client, png, upload  # noqa: F401
from tests.engine.test_residency import checkpoint

BODY = {"checkpoint": "eurosat", "images": [b64(png())]}


@pytest.fixture
def app_on(backbone) -> Iterator[Callable[[str], TestClient]]:
    """An app on the tiny backbone over a given store URL (file:// or redis://)."""
    clients: list[TestClient] = []

    def make(store: str) -> TestClient:
        settings = Settings(store=store, model="tiny_clip", pretrained="none", runtime="torch")
        client = TestClient(create_app(settings, backbone=backbone))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


class Load:
    """Clients classifying in a loop until stopped; statuses counted."""

    def __init__(self, client: Any, threads: int = 3, body: dict[str, Any] = BODY) -> None:
        self.client, self.body, self.stop = client, body, threading.Event()
        self.statuses: Counter[int] = Counter()
        self.versions: Counter[int] = Counter()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stop.is_set():
            r = self.client.post("/v1/classify", json=self.body)
            self.statuses[r.status_code] += 1
            if r.status_code == 200:
                self.versions[r.json()["results"][0]["version"]] += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def wait_for(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        start = sum(self.statuses.values())
        while sum(self.statuses.values()) < start + n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sum(self.statuses.values()) >= start + n, "the load stalled"


def test_redis_killed_and_restarted_under_load(app_on, upload, private_redis):  # noqa: F811
    c = app_on(private_redis.url)
    assert upload(c).status_code == 201
    with private_redis.client() as raw:
        raw.save()  # a Redis with persistence: it comes back with its data
    with Load(c) as load:
        load.wait_for(10)
        private_redis.kill()
        load.wait_for(20)  # resident checkpoints keep being served from memory
        r = upload(c, seed=1)  # a write cannot land: a clear 503, no hang
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
        assert c.get("/readyz").status_code == 200  # stays in rotation by default
        assert c.get("/readyz", params={"strict": "true"}).status_code == 503
        private_redis.start()
        r = upload(c, seed=1)
        assert r.status_code == 201 and r.json()["version"] == 2, r.text
        deadline = time.monotonic() + 10
        while load.versions[2] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # the replica hears of v2 and swaps it in
    assert set(load.statuses) == {200}, load.statuses  # no request failed, before or after
    assert load.versions[1] > 0 and load.versions[2] > 0, load.versions
    store = c.app.state.store
    assert [v.version for v in store.versions("eurosat")] == [1, 2]  # nothing lost


def test_disk_full_during_upload_under_load(make_client, upload, monkeypatch):  # noqa: F811
    c = make_client()
    assert upload(c).status_code == 201
    store = c.app.state.store
    v1 = store.get("eurosat", 1).data
    real = fsio.write_all

    def full(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with Load(c) as load:
        load.wait_for(5)
        monkeypatch.setattr(fsio, "write_all", full)
        r = upload(c, seed=1)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "store_unavailable"
        assert "disk is full" in r.json()["error"]["message"]
        assert [v.version for v in store.versions("eurosat")] == [1]
        load.wait_for(5)
        monkeypatch.setattr(fsio, "write_all", real)
        assert upload(c, seed=1).json()["version"] == 2  # space is back
    assert set(load.statuses) == {200}, load.statuses
    assert store.get("eurosat", 1).data == v1  # the old version's bytes are intact


def test_corrupt_blob_is_a_clear_error_and_stays_contained(app_on, backbone, tmp_path):
    url = f"file://{tmp_path / 'store'}"
    store = open_store(url)
    publish(store, backbone, checkpoint(backbone, name="good"))
    publish(store, backbone, checkpoint(backbone, name="fragile"))
    blob = tmp_path / "store" / "fragile" / "v1.blob"
    blob.write_bytes(bytes([blob.read_bytes()[0] ^ 1]) + blob.read_bytes()[1:])
    store.close()
    c = app_on(url)
    with Load(c, body={"checkpoint": "good", "images": [b64(png())]}) as load:
        load.wait_for(5)
        r = c.post("/v1/classify", json={"checkpoint": "fragile", "images": [b64(png())]})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "corrupt_checkpoint"
        assert "fragile" in r.json()["error"]["message"]
        listing = c.get("/v1/checkpoints/fragile")  # the listing still answers
        assert listing.status_code == 200 and listing.json()["classnames"] is None
        load.wait_for(5)
    assert set(load.statuses) == {200}, load.statuses  # the damage stayed contained
