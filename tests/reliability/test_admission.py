"""Overload is refused at the door: a full server answers 429 before reading or decoding a body
(regression: the 429 used to come from the batcher's queue, after seconds in the decode pool)."""

from __future__ import annotations

import time

from tests.api.conftest import b64, make_client, png, upload  # noqa: F401

BODY = {"checkpoint": "eurosat", "images": [b64(png())]}


def test_full_server_refuses_before_decoding(make_client, upload, monkeypatch):  # noqa: F811
    c = make_client(max_queue=2, max_batch_size=2)
    assert upload(c).status_code == 201
    front = c.app.state.frontend
    assert front.max_admitted == 4  # max_queue + max_batch_size
    decoded: list[int] = []
    real = front.decode
    monkeypatch.setattr(front, "decode", lambda items: decoded.append(1) or real(items))
    front.admitted = front.max_admitted  # as if that many were in progress
    start = time.monotonic()
    r = c.post("/v1/classify", json=BODY)
    assert time.monotonic() - start < 1.0
    assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded", r.text
    assert decoded == []  # refused before any work
    front.admitted = 0
    r = c.post("/v1/classify", json=BODY)
    assert r.status_code == 200 and decoded == [1]
    assert front.admitted == 0  # counted out again, also after errors:
    assert c.post("/v1/classify", json={"checkpoint": "nope", "images": []}).status_code == 400
    assert front.admitted == 0


def test_admission_by_time_refuses_once_the_work_ahead_is_too_long(make_client, upload):  # noqa: F811
    c = make_client(max_queue=1000, max_batch_size=8, max_queue_wait_s=2.0)
    assert upload(c).status_code == 201
    assert c.post("/v1/classify", json=BODY).status_code == 200
    front, batcher = c.app.state.frontend, c.app.state.engine.classifier.batcher
    assert batcher.seconds_per_request > 0  # measured by that request
    batcher.seconds_per_request = 0.5  # as if the model took 0.5 s per request
    front.admitted = 4  # 2 s of work ahead: still within the budget
    assert c.post("/v1/classify", json=BODY).status_code == 200
    batcher.seconds_per_request = 0.5  # (that request's fast batch moved it down)
    front.admitted = 5  # 2.5 s ahead
    r = c.post("/v1/classify", json=BODY)
    assert r.status_code == 429 and "2.5 s of work ahead" in r.json()["error"]["message"]
    front.admitted = 0
