"""PROMPTSERVE_IMAGE_DECODE through the API: the default is the exact CPU path; the device path
(here its code on CPU tensors) serves the same predictions and the same errors."""

from __future__ import annotations

import io

from PIL import Image

from tests.api.conftest import b64, png


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    return buf.getvalue()


def test_served_through_the_api(make_client):
    body = {"classnames": ["red", "blue"], "images": [b64(jpeg()), b64(png())]}
    cpu, dev = make_client(), make_client(image_decode="gpu")
    assert cpu.app.state.engine.classifier.gpu_images is None  # the default: the exact path
    assert dev.app.state.engine.classifier.gpu_images is not None
    assert "CPU backbone" in dev.get("/readyz").json()["image_decode"]
    a, b = (c.post("/v1/classify", json=body) for c in (cpu, dev))
    assert a.status_code == b.status_code == 200
    # per label, not the top label: this random tiny model's two scores may be a near-tie
    preds = [r.json()["results"][0]["predictions"] for r in (a, b)]
    for pa, pb in zip(*preds, strict=True):
        sa, sb = ({p["label"]: p["score"] for p in ps} for ps in (pa, pb))
        assert sa.keys() == sb.keys() and all(abs(sa[k] - sb[k]) < 1e-2 for k in sa)
    bad = dev.post("/v1/classify", json={"classnames": ["a"], "images": [b64(gif())]})
    assert bad.status_code == 415 and bad.json()["error"]["code"] == "unsupported_image_format"
