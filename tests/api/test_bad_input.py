"""Every bad input gets its status from the one table, a code, and leaves the store unchanged."""

from __future__ import annotations

import io
import random
import struct
import threading
import time
import zlib

import pytest
from PIL import Image

from tests.api.conftest import b64, png, store_state
from tests.engine.test_residency import checkpoint


def _err(r, status, code):
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text
    assert r.json()["error"]["message"]


def _bomb_png(w=100_000, h=100_000):
    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 8))
        + chunk(b"IEND", b"")
    )


def _gif():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    return buf.getvalue()


@pytest.fixture
def ready(client, upload):
    upload(client)
    return client


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"checkpoint": "eurosat", "images": ["%%%not base64%%%"]}, 400, "invalid_base64"),
        ({"checkpoint": "eurosat", "images": [b64(png())[:-3]]}, 400, "invalid_base64"),
        ({"checkpoint": "eurosat", "images": [b64(png()[:60])]}, 422, "invalid_image"),
        ({"checkpoint": "eurosat", "images": [b64(_gif())]}, 415, "unsupported_image_format"),
        ({"checkpoint": "eurosat", "images": [b64(_bomb_png())]}, 413, "image_too_large"),
        ({"checkpoint": "eurosat", "images": []}, 400, "bad_request"),
        ({"checkpoint": "nope", "images": [b64(png())]}, 404, "not_found"),
        ({"checkpoint": "../etc/passwd", "images": [b64(png())]}, 400, "bad_request"),
        ({"checkpoint": "eurosat@x", "images": [b64(png())]}, 400, "bad_request"),
        ({"checkpoint": "eurosat@9", "images": [b64(png())]}, 404, "not_found"),
        ({"checkpoint": "eurosat", "images": [b64(png())], "top_k": 0}, 422, "invalid_request"),
        ({"checkpoint": "eurosat", "images": [b64(png())], "top_k": "x"}, 422, "invalid_request"),
        ({"images": [b64(png())]}, 400, "bad_request"),
        (
            {"checkpoint": "eurosat", "classnames": ["a"], "images": [b64(png())]},
            400,
            "bad_request",
        ),
        ({"classnames": [], "images": [b64(png())]}, 422, "invalid_classnames"),
        ({"classnames": ["cat", "Cat"], "images": [b64(png())]}, 422, "invalid_classnames"),
        ({"classnames": ["x" * 10_000], "images": [b64(png())]}, 422, "invalid_classnames"),
        ({"classnames": ["a\u202eb"], "images": [b64(png())]}, 422, "invalid_classnames"),
        (
            {"classnames": ["cat"], "templates": ["{0}"], "images": [b64(png())]},
            422,
            "invalid_classnames",
        ),
        ({"checkpoint": "eurosat", "images": [b64(png())], "extra": 1}, 422, "invalid_request"),
    ],
)
def test_bad_classify_requests(ready, body, status, code):
    before = store_state(ready)
    _err(ready.post("/v1/classify", json=body), status, code)
    assert store_state(ready) == before


def test_too_many_images(make_client, upload):
    c = make_client(max_images=4)
    upload(c)
    _err(
        c.post("/v1/classify", json={"checkpoint": "eurosat", "images": [b64(png())] * 5}),
        413,
        "too_many_images",
    )
    _err(
        c.post("/v1/classify", json={"checkpoint": "eurosat", "images": [b64(png())] * 300}),
        413,
        "too_many_images",
    )


def test_content_types_and_json(ready):
    _err(
        ready.post("/v1/classify", content=b"x", headers={"content-type": "text/plain"}),
        415,
        "unsupported_media",
    )
    _err(
        ready.post("/v1/classify", content=b"{oops", headers={"content-type": "application/json"}),
        400,
        "bad_request",
    )
    _err(
        ready.post("/v1/classify", content=b"[1,2]", headers={"content-type": "application/json"}),
        400,
        "bad_request",
    )
    _err(ready.post("/v1/checkpoints", json={"file": "x"}), 415, "unsupported_media")


def test_body_limit_with_and_without_content_length(make_client):
    c = make_client(max_body_bytes=2048)
    _err(
        c.post("/v1/classify", content=b"x" * 5000, headers={"content-type": "application/json"}),
        413,
        "body_too_large",
    )

    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    r = c.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
    _err(r, 413, "body_too_large")


def test_image_bytes_limit(make_client, upload):
    c = make_client(max_image_bytes=2048)
    upload(c)
    noisy = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))
    buf = io.BytesIO()
    noisy.save(buf, "PNG")
    assert len(buf.getvalue()) > 2048
    _err(
        c.post("/v1/classify", json={"checkpoint": "eurosat", "images": [b64(buf.getvalue())]}),
        413,
        "image_too_large",
    )


def test_bad_uploads_never_reach_the_store(ready, backbone, other_backbone):
    before = store_state(ready)
    cases = [
        (b"\x80\x04\x95pickle", 422, "malformed_checkpoint"),
        (checkpoint(other_backbone, name="eurosat"), 422, "backbone_mismatch"),
        (b"", 422, "malformed_checkpoint"),
    ]
    for data, status, code in cases:
        r = ready.post("/v1/checkpoints", files={"file": ("x.safetensors", data)})
        _err(r, status, code)
    _err(ready.post("/v1/checkpoints", files={"other": ("x", b"abc")}), 400, "bad_request")
    assert store_state(ready) == before


def test_oversized_upload(make_client, backbone):
    c = make_client(max_checkpoint_bytes=2048)
    blob = checkpoint(backbone, name="big", method="maple", config={"depth": 2})
    _err(
        c.post("/v1/checkpoints", files={"file": ("big.safetensors", blob)}),
        413,
        "checkpoint_too_large",
    )
    assert store_state(c) == {}


def test_management_errors(ready):
    before = store_state(ready)
    _err(ready.post("/v1/checkpoints/eurosat/activate", json={"version": 7}), 404, "not_found")
    _err(
        ready.post("/v1/checkpoints/eurosat/activate", json={"version": 0}), 422, "invalid_request"
    )
    _err(ready.post("/v1/checkpoints/nope/activate", json={"version": 1}), 404, "not_found")
    _err(ready.delete("/v1/checkpoints/nope"), 404, "not_found")
    _err(ready.get("/v1/checkpoints/nope"), 404, "not_found")
    _err(ready.get("/v1/checkpoints/" + "a" * 1000), 400, "bad_request")
    _err(ready.delete("/v1/checkpoints/a%00b"), 400, "bad_request")
    _err(ready.get("/v1/nothing-here"), 404, "not_found")
    assert store_state(ready) == before


def test_full_queue_is_429_at_once(make_client, upload, backbone, monkeypatch):
    c = make_client(max_queue=1, max_batch_size=1, max_wait_ms=0)
    upload(c)
    gate, started = threading.Event(), threading.Event()
    original = backbone.encode_image

    def slow(*a, **k):
        started.set()
        gate.wait(10)
        return original(*a, **k)

    monkeypatch.setattr(backbone, "encode_image", slow)
    body = {"checkpoint": "eurosat", "images": [b64(png())]}
    results = []

    def send():
        results.append(c.post("/v1/classify", json=body))

    running = threading.Thread(target=send)
    running.start()
    assert started.wait(10)  # the first request is in the encoder
    queued = threading.Thread(target=send)
    queued.start()
    batcher = c.app.state.engine.classifier.batcher
    deadline = time.monotonic() + 10
    while batcher.queue_depth < 1 and time.monotonic() < deadline:
        time.sleep(0.01)  # under load the second request takes a while to reach the queue
    assert batcher.queue_depth == 1
    start = time.monotonic()
    r = c.post("/v1/classify", json=body)
    assert time.monotonic() - start < 1.0
    _err(r, 429, "overloaded")
    assert r.headers["retry-after"] == "1"  # a client is told when to come back
    gate.set()
    running.join()
    queued.join()
    assert sorted(x.status_code for x in results) == [200, 200]


def test_deadline_is_504_without_compute(make_client, upload, backbone, monkeypatch):
    c = make_client(request_timeout_s=0.3, max_batch_size=1, max_wait_ms=0)
    upload(c)
    gate, started = threading.Event(), threading.Event()
    original = backbone.encode_image
    sizes = []

    def slow(images, *a, **k):
        sizes.append(images.shape[0])
        started.set()
        gate.wait(5)
        return original(images, *a, **k)

    monkeypatch.setattr(backbone, "encode_image", slow)
    body = {"checkpoint": "eurosat", "images": [b64(png())]}
    first: list = []
    t = threading.Thread(target=lambda: first.append(c.post("/v1/classify", json=body)))
    t.start()
    assert started.wait(10)  # the first request is running: the next one must queue
    _err(c.post("/v1/classify", json=body), 504, "deadline_exceeded")
    gate.set()
    t.join()
    assert len(sizes) == 1  # the expired request never reached the encoder


def test_a_checkpoint_upload_is_bounded_by_the_checkpoint_limit_not_the_body_limit(
    make_client, backbone
):
    """An M²PT checkpoint with a 7B output head (~275 MB) is larger than any other request: its
    upload route takes the checkpoint limit, every other route keeps the body limit."""
    c = make_client(max_body_bytes=2048, max_checkpoint_bytes=2**20)
    blob = checkpoint(backbone, name="big", method="maple", config={"depth": 2})
    assert 2048 < len(blob) < 2**20
    r = c.post("/v1/checkpoints", files={"file": ("big.safetensors", blob)})
    assert r.status_code == 201, r.text
    huge = b"x" * (2**20 + 2**17)  # past the checkpoint limit and the multipart allowance
    _err(c.post("/v1/checkpoints", files={"file": ("h.safetensors", huge)}), 413, "body_too_large")
    _err(
        c.post("/v1/classify", content=b"x" * 5000, headers={"content-type": "application/json"}),
        413,
        "body_too_large",
    )
