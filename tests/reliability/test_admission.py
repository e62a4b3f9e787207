"""Overload is refused at the door: a full server answers 429 before reading or decoding a body
(regression: the 429 used to come from the batcher's queue, after seconds in the decode pool)."""

from __future__ import annotations

import pytest

from service import errors
from service.api.frontend import FrontEnd
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
    r = c.post("/v1/classify", json=BODY)
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


def test_admission_by_time_counts_the_work_every_front_end_admitted(tmp_path):
    """With --frontends N each front end publishes its count; each refuses on the sum."""
    import contextlib
    from dataclasses import replace

    from service.engine.control import ControlBlock
    from service.engine.protocol import Load

    class Engine:  # the engine's measured speed: 0.5 s per request
        def load(self) -> Load:
            return Load(0, 0.5)

    board = ControlBlock.create("promptserve-1-control", tmp_path)
    try:
        first = FrontEnd(Engine(), None, None, 64, 30.0, max_queue_wait_s=2.0, board=board)
        second = replace(first, index=1)
        with contextlib.ExitStack() as held:
            for _ in range(4):
                held.enter_context(first.admission())
            # 4 admitted elsewhere x 0.5 s = 2 s ahead: still within the budget
            held.enter_context(second.admission())
            assert board.admitted() == 5 and second.total_admitted() == 5
            with pytest.raises(errors.Overloaded, match=r"2\.5 s of work ahead"):
                held.enter_context(second.admission())  # refused by the sum, not its own 1
            assert second.admitted == 1
        assert board.admitted() == 0
    finally:
        board.close()
