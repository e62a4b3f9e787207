"""The bad-input corpus against the real app: each item gets its status and error code from the
one table, and the store is unchanged afterwards (names, versions, pointers and bytes).

tests/api/test_bad_input.py, tests/api/test_auth.py, tests/test_images.py and
tests/test_checkpoints.py cover the decoders and validators one by one; here every corpus item
goes through HTTP, as JSON and as multipart where both exist."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import ADMIN, READ, client, make_client, png, upload  # noqa: F401
from tests.reliability.corpus import BASE64, CLASSNAMES_BAD, IMAGES, b64, checkpoints, write_corpus

ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
READ_H = {"Authorization": f"Bearer {READ}"}


def snapshot(c: Any) -> dict[str, Any]:
    """Everything the store holds, bytes included (a digest per version)."""
    store = c.app.state.store
    out: dict[str, Any] = {}
    for name in store.names():
        versions = [v.version for v in store.versions(name)]
        digests = [hashlib.sha256(store.get(name, v).data).hexdigest() for v in versions]
        out[name] = (store.current(name), versions, digests)
    return out


def expect(r: Any, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]


@pytest.fixture
def ready(make_client, upload):  # noqa: F811
    c = make_client(api_keys=READ, admin_keys=ADMIN)
    assert upload(c, headers=ADMIN_H).status_code == 201
    return c


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_bad_images_as_json_and_multipart(ready, name):
    data, status, code = IMAGES[name]
    before = snapshot(ready)
    body = {"checkpoint": "eurosat", "images": [b64(data)]}
    expect(ready.post("/v1/classify", json=body, headers=READ_H), status, code)
    r = ready.post(
        "/v1/classify",
        data={"checkpoint": "eurosat"},
        files={"images": ("x.bin", data, "application/octet-stream")},
        headers=READ_H,
    )
    expect(r, status, code)
    assert snapshot(ready) == before


def test_an_empty_file_part(ready):
    before = snapshot(ready)
    files = {"images": ("x.png", b"", "image/png")}
    r = ready.post("/v1/classify", data={"checkpoint": "eurosat"}, files=files, headers=READ_H)
    expect(r, 422, "invalid_image")
    assert snapshot(ready) == before


def test_one_bad_image_among_good_ones_fails_the_request(ready):
    before = snapshot(ready)
    images = [b64(png())] * 3 + [b64(IMAGES["png-bomb-100k-x-100k"][0])]
    r = ready.post("/v1/classify", json={"checkpoint": "eurosat", "images": images}, headers=READ_H)
    expect(r, 413, "image_too_large")
    assert snapshot(ready) == before


@pytest.mark.parametrize("name", sorted(BASE64))
def test_bad_base64(ready, name):
    text, status, code = BASE64[name]
    before = snapshot(ready)
    body = {"checkpoint": "eurosat", "images": [text]}
    expect(ready.post("/v1/classify", json=body, headers=READ_H), status, code)
    assert snapshot(ready) == before


@pytest.mark.parametrize("name", sorted(CLASSNAMES_BAD))
def test_bad_ad_hoc_classnames(ready, name):
    before = snapshot(ready)
    body = {"classnames": CLASSNAMES_BAD[name], "images": [b64(png())]}
    expect(ready.post("/v1/classify", json=body, headers=READ_H), 422, "invalid_classnames")
    assert snapshot(ready) == before


@pytest.fixture(scope="module")
def bad_checkpoints(backbone, other_backbone):
    return checkpoints(backbone, other_backbone)


CHECKPOINT_CASES = sorted(
    [
        "nan", "inf", "wrong-shape", "missing-tensor", "extra-tensor", "wrong-dtype",
        "foreign-backbone", "pickle-renamed", "header-lies-about-offsets", "header-length-2^60",
        "no-manifest", "empty-file", "unknown-method", "empty-classnames", "rtl-classname",
        "name-dotdot", "name-slash", "name-backslash", "name-nul", "name-1000-chars",
        "name-empty", "name-dot", "name-control",
    ]
)  # fmt: skip


def test_the_checkpoint_corpus_is_complete(bad_checkpoints):
    assert sorted(bad_checkpoints) == CHECKPOINT_CASES


@pytest.mark.parametrize("name", CHECKPOINT_CASES)
def test_bad_checkpoint_uploads(ready, bad_checkpoints, name):
    data, status, code = bad_checkpoints[name]
    before = snapshot(ready)
    r = ready.post("/v1/checkpoints", files={"file": ("x.safetensors", data)}, headers=ADMIN_H)
    expect(r, status, code)
    assert snapshot(ready) == before
    folder = ready.app.state.settings.store.removeprefix("file://")
    assert all(".." not in p.name for p in Path(folder).rglob("*"))  # nothing escaped


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/checkpoints/..%2F..%2Fetc%2Fpasswd", 404, "not_found"),
        ("/v1/checkpoints/%2E%2E", 400, "bad_request"),
        ("/v1/checkpoints/a%00b", 400, "bad_request"),
        ("/v1/checkpoints/" + "a" * 1000, 400, "bad_request"),
        ("/v1/checkpoints/a%1Bb", 400, "bad_request"),
        ("/v1/checkpoints/a%5Cb", 400, "bad_request"),
        ("/v1/checkpoints/%E2%80%AEab", 400, "bad_request"),
    ],
)
def test_bad_names_in_paths(ready, path, status, code):
    before = snapshot(ready)
    for method, suffix, kw in (
        ("get", "", {}),
        ("get", "/versions", {}),
        ("delete", "", {}),
        ("post", "/activate", {"json": {"version": 1}}),
    ):
        r = getattr(ready, method)(path + suffix, headers=ADMIN_H, **kw)
        expect(r, status, code)
    assert snapshot(ready) == before


@pytest.mark.parametrize(
    ("method", "path", "kw"),
    [
        ("post", "/v1/checkpoints", {"files": {"file": ("x.safetensors", b"x")}}),
        ("post", "/v1/checkpoints/eurosat/activate", {"json": {"version": 1}}),
        ("delete", "/v1/checkpoints/eurosat", {}),
        ("post", "/v1/jobs", {"json": {"name": "n", "method": "coop"}}),
        ("delete", "/v1/jobs/abc", {}),
    ],
)
def test_admin_routes_refuse_no_key_and_read_keys(ready, method, path, kw):
    before = snapshot(ready)
    for headers, status, code in (
        ({}, 401, "unauthorized"),
        ({"Authorization": "Bearer wrong"}, 401, "unauthorized"),
        ({"Authorization": f"Bearer {READ}x"}, 401, "unauthorized"),
        ({"Authorization": f"Basic {READ}"}, 401, "unauthorized"),
        (READ_H, 403, "forbidden"),
    ):
        expect(getattr(ready, method)(path, headers=headers, **kw), status, code)
    assert snapshot(ready) == before


@pytest.mark.parametrize(
    ("path", "ctype", "body", "code"),
    [
        ("/v1/classify", "text/plain", b"hello", "unsupported_media"),
        ("/v1/classify", "application/xml", b"<a/>", "unsupported_media"),
        ("/v1/classify", "application/x-www-form-urlencoded", b"a=1", "unsupported_media"),
        ("/v1/classify", "image/png", png(), "unsupported_media"),
        ("/v1/checkpoints", "application/json", b"{}", "unsupported_media"),
        ("/v1/checkpoints", "application/octet-stream", b"\0" * 64, "unsupported_media"),
    ],
)
def test_wrong_content_types(ready, path, ctype, body, code):
    before = snapshot(ready)
    r = ready.post(path, content=body, headers={"content-type": ctype, **ADMIN_H})
    expect(r, 415, code)
    assert snapshot(ready) == before


def test_multipart_without_boundary_or_garbled(ready):
    before = snapshot(ready)
    for path in ("/v1/classify", "/v1/checkpoints"):
        for ctype, body in (
            ("multipart/form-data", b"--x\r\n"),
            ("multipart/form-data; boundary=zz", b"garbage without any boundary"),
        ):
            r = ready.post(path, content=body, headers={"content-type": ctype, **ADMIN_H})
            expect(r, 400, "bad_request")
    assert snapshot(ready) == before


def test_bodies_over_the_limit_with_and_without_length(make_client, upload):  # noqa: F811
    # a checkpoint upload is bounded by the checkpoint limit (+ 64 KiB of multipart framing),
    # every other route by the body limit
    c = make_client(max_body_bytes=4096, max_checkpoint_bytes=4096)
    assert upload(c).status_code in (201, 413)
    before = snapshot(c)
    big = png((200, 200))
    files = {"images": ("a.png", big * 10)}
    expect(c.post("/v1/classify", files=files), 413, "body_too_large")

    def stream():
        for _ in range(100):
            yield b"A" * 1024  # no Content-Length: counted while streaming

    for path, ctype in (
        ("/v1/classify", "application/json"),
        ("/v1/classify", "multipart/form-data; boundary=b"),
        ("/v1/checkpoints", "multipart/form-data; boundary=b"),
    ):
        r = c.post(path, content=stream(), headers={"content-type": ctype})
        expect(r, 413, "body_too_large")
    r = c.post(
        "/v1/classify", content=b"{}", headers={"content-type": "application/json",
                                                "content-length": "not-a-number"}
    )  # fmt: skip
    expect(r, 400, "bad_request")  # was 413 "body over the limit" (regression)
    assert snapshot(c) == before


def test_hundreds_of_images_as_multipart(make_client, upload):  # noqa: F811
    c = make_client(max_images=8)
    upload(c)
    before = snapshot(c)
    files = [("images", (f"{i}.png", png((8, 8)), "image/png")) for i in range(300)]
    r = c.post("/v1/classify", data={"checkpoint": "eurosat"}, files=files)
    expect(r, 413, "too_many_images")  # was 400 "malformed multipart body" (regression)
    assert snapshot(c) == before


def test_the_corpus_can_be_written_out(tmp_path, backbone, other_backbone):
    n = write_corpus(tmp_path / "corpus", backbone, other_backbone)
    assert n == len(IMAGES) + len(CHECKPOINT_CASES)
    assert len(list((tmp_path / "corpus").iterdir())) == n
