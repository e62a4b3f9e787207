"""Residency: lazy loads, single flight, LRU tiers, hot swap, and a store that fails."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from prompts_store import open_store
from service import errors
from service.checkpoints import dump, new_manifest
from service.checkpoints.publish import publish
from service.engine.forward import classify
from service.engine.residency import Residency
from service.prompts import get_method
from service.prompts.plans import Plan
from tests.conftest import CLASSNAMES
from tests.redis_server import _start_server


def checkpoint(backbone, name="eurosat", seed=0, method="coop", config=None, classnames=None):
    m = get_method(method)
    cfg = m.config(config or ({"n_ctx": 4} if method == "coop" else {}))
    names = classnames or CLASSNAMES
    params = m.init(backbone, cfg, names, seed=seed)
    params = {k: v + 0.1 * torch.randn_like(v) for k, v in params.items()}
    return dump(params, new_manifest(name, method, backbone, names, cfg.model_dump()))


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def store(tmp_path):
    s = open_store(f"file://{tmp_path / 'store'}")
    yield s
    s.close()


@pytest.fixture
def residency(store, backbone):
    r = Residency(store, backbone, Plan)
    yield r
    r.close()


def test_lazy_load_then_hits_and_pinning(residency, store, backbone):
    publish(store, backbone, checkpoint(backbone, seed=1))
    publish(store, backbone, checkpoint(backbone, seed=2))
    first = residency.resolve("eurosat")
    assert (first.version, residency.stats.loads, residency.stats.misses) == (2, 1, 1)
    assert residency.resolve("eurosat") is first and residency.stats.hits == 1
    pinned = residency.resolve("eurosat@1")
    assert pinned.version == 1 and residency.stats.loads == 2
    assert not torch.equal(pinned.plan.classes, first.plan.classes)


def test_bad_references(residency):
    with pytest.raises(errors.NotFound):
        residency.resolve("nothing-here")
    for ref in ("../etc", "a/b", "x@0", "x@-1", "x@v2", "a" * 1000, "nul\x00"):
        with pytest.raises(errors.BadRequest):
            residency.resolve(ref)


def test_cold_burst_loads_once(residency, store, backbone, monkeypatch):
    publish(store, backbone, checkpoint(backbone))
    original = residency._load
    gate = threading.Event()

    def slow_load(key):
        gate.wait(2)
        return original(key)

    monkeypatch.setattr(residency, "_load", slow_load)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(residency.resolve("eurosat")))
        for _ in range(16)
    ]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join()
    assert len(results) == 16 and len({id(r) for r in results}) == 1
    assert residency.stats.loads == 1


def test_hot_swap_keeps_in_flight_on_their_version(residency, store, backbone, images):
    publish(store, backbone, checkpoint(backbone, seed=1))
    residency.start()
    old = residency.resolve("eurosat")
    publish(store, backbone, checkpoint(backbone, seed=2))
    assert wait_until(lambda: residency.resolve("eurosat").version == 2)
    assert residency.stats.swaps == 1
    # a request that started on version 1 still holds it, intact
    assert old.version == 1
    before = classify(backbone, images, [old.plan] * len(images))
    assert len(before) == len(images)
    store.activate("eurosat", 1)  # rollback reaches the replica too
    assert wait_until(lambda: residency.resolve("eurosat").version == 1)


@pytest.mark.parametrize("damage", ["foreign_backbone", "corrupt_blob"])
def test_bad_version_never_replaces_a_good_one(
    residency, store, backbone, other_backbone, damage, tmp_path
):
    publish(store, backbone, checkpoint(backbone, seed=1))
    residency.start()
    assert residency.resolve("eurosat").version == 1
    if damage == "foreign_backbone":
        store.put("eurosat", checkpoint(other_backbone, seed=2), {})  # bypasses validation
    else:
        store.put("eurosat", checkpoint(backbone, seed=2), {}, activate=False)
        blob = next((tmp_path / "store" / "eurosat").glob("v2.blob"))
        blob.write_bytes(blob.read_bytes()[:-4] + b"\x00\x00\x00\x00")
        store.activate("eurosat", 2)
    assert wait_until(lambda: residency.stats.swap_failures == 1)
    assert residency.resolve("eurosat").version == 1  # the good one keeps serving
    expected = errors.BackboneMismatch if damage == "foreign_backbone" else errors.CorruptCheckpoint
    with pytest.raises(expected):
        residency.resolve("eurosat@2")


def test_lru_tiers_demote_then_evict(store, backbone):
    for i in range(5):
        publish(store, backbone, checkpoint(backbone, name=f"ds{i}", seed=i))
    size = Residency(store, backbone, Plan).resolve("ds0").nbytes
    r = Residency(store, backbone, Plan, device_budget=2 * size, host_budget=2 * size)
    for i in range(5):
        r.resolve(f"ds{i}")
    assert (r.stats.loads, r.stats.demotions, r.stats.evictions) == (5, 3, 1)
    health = r.health()
    assert health["resident"] == 4 and health["device_bytes"] <= 2 * size
    r.resolve("ds2")  # demoted to host: promoted back without touching the store
    assert r.stats.loads == 5
    r.resolve("ds0")  # evicted: loaded again from the store
    assert r.stats.loads == 6


def test_delete_reaches_the_replica(residency, store, backbone):
    publish(store, backbone, checkpoint(backbone))
    residency.start()
    residency.resolve("eurosat")
    store.delete("eurosat")
    assert wait_until(lambda: "eurosat" not in residency.current())
    with pytest.raises(errors.NotFound):
        residency.resolve("eurosat")


def test_delete_reaches_pinned_versions_on_a_replica(residency, store, backbone):
    """A replica that only ever served `name@1` (pinned, so never its current pointer) must drop
    it when the name is deleted elsewhere: it was served from memory after the delete."""
    publish(store, backbone, checkpoint(backbone, seed=1))
    publish(store, backbone, checkpoint(backbone, seed=2))
    residency.start()
    residency.resolve("eurosat@1")
    assert residency.health()["resident"] == 1
    store.delete("eurosat")  # through the store: this replica hears it as an event only
    assert wait_until(lambda: residency.health()["resident"] == 0)
    with pytest.raises(errors.NotFound):
        residency.resolve("eurosat@1")


def test_upload_is_validated_before_the_store_sees_it(store, backbone, other_backbone):
    with pytest.raises(errors.BackboneMismatch):
        publish(store, backbone, checkpoint(other_backbone))
    with pytest.raises(errors.MalformedCheckpoint):
        publish(store, backbone, b"not a checkpoint at all")
    assert store.names() == []


def test_redis_down_keeps_serving_and_recovers(backbone, tmp_path: Path, images):
    server = _start_server(tmp_path, persist=True)
    store = open_store(server.url)
    residency = Residency(store, backbone, Plan)
    try:
        publish(store, backbone, checkpoint(backbone, name="a", seed=1))
        publish(store, backbone, checkpoint(backbone, name="b", seed=2))
        residency.start()
        a = residency.resolve("a")
        server.kill()
        # resident checkpoints keep answering, with no store round trip
        for _ in range(3):
            got = residency.resolve("a")
            assert got is a
            assert len(classify(backbone, images, [got.plan] * len(images))) == len(images)
        with pytest.raises(errors.StoreUnavailable):
            residency.resolve("b")  # not resident: needs the store
        start = time.monotonic()
        with pytest.raises(errors.StoreUnavailable):
            publish(store, backbone, checkpoint(backbone, name="c"))
        assert time.monotonic() - start < 3.0
        assert wait_until(lambda: residency.health()["store"] == "degraded")
        server.start()
        assert wait_until(lambda: residency.health()["store"] == "ok", timeout=10)
        # an upload made after the restart reaches the service, and "a" still serves
        publish(store, backbone, checkpoint(backbone, name="a", seed=3))
        assert wait_until(lambda: residency.resolve("a").version == 2, timeout=10)
        assert residency.resolve("b").version == 1
    finally:
        residency.close()
        store.close()
        server.kill()


def test_a_load_overtaken_by_a_deletion_is_not_kept(residency, store, backbone, monkeypatch):
    """The bytes were read just before the name was deleted: the load finishes, but what it
    loaded must not become resident (it would be served, pinned, after the delete)."""
    publish(store, backbone, checkpoint(backbone))
    real = residency._load

    def load_then_deleted(key):
        loaded = real(key)
        residency.forget(key[0])  # the deletion lands while the load is finishing
        return loaded

    monkeypatch.setattr(residency, "_load", load_then_deleted)
    with pytest.raises(errors.NotFound):
        residency.resolve("eurosat@1")
    assert residency.health()["resident"] == 0
