"""Metric series stay bounded: no label takes a checkpoint name or anything a client sends, so
thousands of checkpoints (the point of this service) cannot grow Prometheus's series."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from service.checkpoints import dump, new_manifest, parse
from service.checkpoints.publish import publish
from tests.api.conftest import b64, png
from tests.engine.test_residency import checkpoint


def series(client) -> set[tuple[str, tuple]]:
    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_1000_checkpoints_and_1000_unknown_names_add_no_series(client, backbone):
    store = client.app.state.store
    names = [f"ckpt-{i}" for i in range(1000)]
    ckpt = parse(checkpoint(backbone, name="template"))
    m = ckpt.manifest
    for name in names:  # the same parameters under 1,000 names
        manifest = new_manifest(name, m.method, backbone, m.classnames, m.method_config)
        publish(store, backbone, dump(ckpt.params, manifest))
    image = b64(png())
    # one request of each kind first: every series that will ever exist exists now
    assert client.post("/v1/classify", json={"checkpoint": names[0], "images": [image]}).is_success
    client.post("/v1/classify", json={"checkpoint": "never-uploaded", "images": [image]})
    before = series(client)
    for i in range(0, 1000, 50):
        r = client.post("/v1/classify", json={"checkpoints": names[i : i + 50], "images": [image]})
        assert r.status_code == 200 and len(r.json()["results"]) == 50
    for i in range(1000):
        r = client.post("/v1/classify", json={"checkpoint": f"unknown-{i}", "images": [image]})
        assert r.status_code == 404
    after = series(client)
    assert after == before, sorted(after - before)[:10]
    assert not any("ckpt-" in str(labels) for _, labels in after)
