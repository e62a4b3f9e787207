"""Every route, through HTTP, against the app on the tiny backbone."""

from __future__ import annotations

import torch

from tests.api.conftest import b64, png


def test_classify_by_checkpoint_json_and_multipart(client, upload):
    assert upload(client).status_code == 201
    img = b64(png())
    r = client.post(
        "/v1/classify", json={"checkpoint": "eurosat", "images": [img, img], "top_k": 2}
    )
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert (result["checkpoint"], result["version"], result["method"]) == ("eurosat", 1, "coop")
    assert len(result["predictions"]) == 2 and len(result["predictions"][0]) == 2
    scores = [p["score"] for p in result["predictions"][0]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-6
    r2 = client.post(
        "/v1/classify",
        files=[("images", ("a.png", png()))],
        data={"checkpoint": "eurosat", "top_k": "4"},
    )
    assert r2.status_code == 200, r2.text
    full = r2.json()["results"][0]["predictions"][0]
    assert abs(sum(p["score"] for p in full) - 1.0) < 1e-5  # softmax over all 4 classes
    assert [p["label"] for p in full[:2]] == [p["label"] for p in result["predictions"][0]]
    assert abs(full[0]["score"] - result["predictions"][0][0]["score"]) < 1e-5


def test_classify_several_checkpoints_and_pins(client, upload, backbone, monkeypatch):
    upload(client, "eurosat", seed=1)
    upload(client, "eurosat", seed=2)
    upload(client, "pets", seed=3, method="maple", config={"depth": 2})
    calls = []
    original = backbone.encode_image

    def counting(images, *a, **k):
        calls.append(images.shape[0])
        return original(images, *a, **k)

    monkeypatch.setattr(backbone, "encode_image", counting)
    r = client.post(
        "/v1/classify",
        json={"checkpoints": ["eurosat", "eurosat@1", "pets"], "images": [b64(png())]},
    )
    assert r.status_code == 200, r.text
    got = [(x["checkpoint"], x["version"]) for x in r.json()["results"]]
    assert got == [("eurosat", 2), ("eurosat", 1), ("pets", 1)]
    # CoOp versions share the plain pass; MaPLe has its own tokens: one batch, two signatures
    assert sorted(calls) == [1, 1]


def test_zero_shot_with_ad_hoc_classes_is_cached(client):
    body = {
        "classnames": ["cat", "dog", "car"],
        "templates": ["a photo of a {}."],
        "images": [b64(png())],
        "top_k": 3,
    }
    r = client.post("/v1/classify", json=body)
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["checkpoint"] is None and res["method"] == "zeroshot"
    assert {p["label"] for p in res["predictions"][0]} == {"cat", "dog", "car"}
    cache = client.app.state.engine.classifier.zeroshot
    client.post("/v1/classify", json=body)
    assert (cache.misses, cache.hits) == (1, 1)


def test_embed_images_and_texts(client, upload):
    upload(client, "pets", method="maple", config={"depth": 2})
    r = client.post("/v1/embed", json={"images": [b64(png())], "texts": ["a cat", "a dog"]})
    assert r.status_code == 200, r.text
    body = r.json()
    img = torch.tensor(body["image_embeddings"])
    txt = torch.tensor(body["text_embeddings"])
    assert img.shape == (1, 32) and txt.shape == (2, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(1), atol=1e-5)
    prompted = client.post("/v1/embed", json={"images": [b64(png())], "checkpoint": "pets"})
    assert prompted.json()["checkpoint"] == "pets" and prompted.json()["version"] == 1
    assert not torch.allclose(torch.tensor(prompted.json()["image_embeddings"]), img)


def test_checkpoint_management_routes(client, upload):
    assert upload(client, seed=1).json() == {
        "name": "eurosat",
        "version": 1,
        "method": "coop",
        "active": True,
    }
    assert upload(client, seed=2).json()["version"] == 2
    listing = client.get("/v1/checkpoints").json()["checkpoints"]
    assert listing == [{"name": "eurosat", "version": 2, "method": "coop", "classes": 4}]
    detail = client.get("/v1/checkpoints/eurosat").json()
    assert detail["version"] == 2 and [v["active"] for v in detail["versions"]] == [False, True]
    assert detail["classnames"] == ["cat", "dog", "red_car", "sea turtle"]
    versions = client.get("/v1/checkpoints/eurosat/versions").json()["versions"]
    assert [v["version"] for v in versions] == [1, 2] and len(versions[0]["sha256"]) == 64
    r = client.post("/v1/checkpoints/eurosat/activate", json={"version": 1})
    assert r.json() == {"name": "eurosat", "version": 1, "active": True}
    r = client.post("/v1/checkpoints/eurosat/activate", json={"version": 2, "expected": 2})
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    assert client.delete("/v1/checkpoints/eurosat").json() == {"name": "eurosat", "deleted": True}
    empty = client.get("/v1/checkpoints").json()
    assert empty["checkpoints"] == [] and empty["total"] == 0


def test_ops_routes(client, upload):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready" and ready.json()["store"] == "ok"
    assert ready.json()["runtime"] == "torch"
    upload(client)
    client.post("/v1/classify", json={"checkpoint": "eurosat", "images": [b64(png())]})
    client.post("/v1/classify", json={"checkpoint": "missing", "images": [b64(png())]})
    text = client.get("/metrics").text
    for needle in (
        'promptserve_request_seconds_count{route="classify"} 1.0',
        "promptserve_batch_images_count",
        "promptserve_queue_depth",
        "promptserve_residency_loads_total 1.0",
        "promptserve_residency_misses_total",
        "promptserve_residency_swaps_total",
        'promptserve_errors_total{code="not_found"} 1.0',
    ):
        assert needle in text, needle
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {
        "/v1/classify",
        "/v1/embed",
        "/v1/checkpoints",
        "/v1/checkpoints/{name}/activate",
        "/readyz",
        "/metrics",
    } <= set(spec["paths"])
    assert "x-request-id" in ready.headers


def test_request_id_is_echoed(client):
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces\x01"})
    assert r.headers["x-request-id"] != "bad id with spaces\x01"


def test_onnx_runtime_serves_the_same_answers(make_client, upload, tmp_path):
    eager = make_client()
    onnx = make_client(runtime="onnx", onnx_cache_dir=str(tmp_path / "onnx"))
    ready = onnx.get("/readyz").json()
    assert ready["runtime"] == "onnx"
    assert ready["runtime_reason"] == "asked for by --runtime onnx"
    upload(eager, "pets", method="maple", config={"depth": 2})
    body = {
        "checkpoint": "pets",
        "images": [b64(png()), b64(png((50, 50), (0, 90, 200)))],
        "top_k": 4,
    }
    a = eager.post("/v1/classify", json=body).json()["results"][0]["predictions"]
    b = onnx.post("/v1/classify", json=body).json()["results"][0]["predictions"]
    for x, y in zip(a, b, strict=True):
        assert [p["label"] for p in x] == [p["label"] for p in y]
        assert max(abs(p["score"] - q["score"]) for p, q in zip(x, y, strict=True)) < 1e-4


def test_requests_larger_than_a_batch_are_served_in_chunks(make_client, upload):
    c = make_client(max_batch_size=4, max_images=10)
    upload(c)
    colors = [(i * 25, 255 - i * 25, 90) for i in range(10)]
    images = [b64(png((32, 32), col)) for col in colors]
    big = c.post("/v1/classify", json={"checkpoint": "eurosat", "images": images, "top_k": 1})
    assert big.status_code == 200, big.text
    preds = big.json()["results"][0]["predictions"]
    assert len(preds) == 10
    for i in (0, 5, 9):
        one = c.post(
            "/v1/classify", json={"checkpoint": "eurosat", "images": [images[i]], "top_k": 1}
        ).json()["results"][0]["predictions"][0]
        assert one[0]["label"] == preds[i][0]["label"]
        assert abs(one[0]["score"] - preds[i][0]["score"]) < 1e-5
    emb = c.post("/v1/embed", json={"images": images}).json()["image_embeddings"]
    assert len(emb) == 10


def test_a_deleted_checkpoint_is_not_served_even_when_pinned(client, upload):
    assert upload(client, seed=1).status_code == 201
    assert upload(client, seed=2).status_code == 201
    body = {"checkpoint": "eurosat@1", "images": [b64(png())]}
    assert client.post("/v1/classify", json=body).status_code == 200
    assert client.delete("/v1/checkpoints/eurosat").status_code == 200
    gone = client.post("/v1/classify", json=body)
    assert gone.status_code == 404, gone.text
    assert client.get("/v1/checkpoints/eurosat").status_code == 404
