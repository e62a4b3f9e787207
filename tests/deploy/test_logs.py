"""Structured logs: JSON lines carrying the request id the client gets back, and a start-up line
that says what this replica is (backbone, device, runtime, store, auth)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service import logs
from service.app import create_app
from service.middleware import RequestId
from service.settings import Settings


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger writing JSON into a buffer (restored afterwards)."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    logs.configure("json", "DEBUG")
    buf = io.StringIO()
    (ours,) = [h for h in root.handlers if h.get_name() == "promptserve"]
    ours.stream = buf  # type: ignore[attr-defined]
    yield buf
    root.handlers[:], root.level = saved[0], saved[1]


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def tiny_app() -> FastAPI:
    app = FastAPI()

    @app.get("/work")
    async def work() -> dict[str, str]:
        # a line logged from a worker thread, as the engine's blocking calls are
        await asyncio.to_thread(logging.getLogger("service.engine").info, "computing")
        return {"ok": "yes"}

    app.add_middleware(logs.RequestLog)
    app.add_middleware(RequestId)
    return app


def test_every_line_of_a_request_carries_the_id_the_client_gets(captured):
    with TestClient(tiny_app()) as client:
        given = client.get("/work", headers={"X-Request-ID": "trace-42"})
        made = client.get("/work")
    assert given.headers["x-request-id"] == "trace-42"
    made_id = made.headers["x-request-id"]
    assert len(made_id) == 32 and made_id != "trace-42"
    records = lines(captured)
    work = [r for r in records if r["msg"] == "computing"]
    assert [r["request_id"] for r in work] == ["trace-42", made_id]
    access = [r for r in records if r["logger"] == "promptserve.access"]
    assert [(r["request_id"], r["path"], r["status"]) for r in access] == [
        ("trace-42", "/work", 200),
        (made_id, "/work", 200),
    ]
    assert all(r["duration_ms"] >= 0 and r["level"] == "info" for r in access)
    logging.getLogger("outside").warning("no request here", extra={"color_message": "\x1b[1m"})
    assert "request_id" not in lines(captured)[-1] and "color_message" not in lines(captured)[-1]


def test_a_bad_client_id_is_replaced_not_echoed(captured):
    with TestClient(tiny_app()) as client:
        r = client.get("/work", headers={"X-Request-ID": "evil\nid with spaces"})
    assert r.headers["x-request-id"] != "evil\nid with spaces"
    assert lines(captured)[-1]["request_id"] == r.headers["x-request-id"]


def test_text_format_appends_the_id():
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter(logs.TEXT_FORMAT))
    handler.addFilter(logs._RequestIdText())
    log = logging.getLogger("test.text")
    log.addHandler(handler)
    token = logs.request_id.set("abc123")
    try:
        log.warning("slow batch %d", 7)
    finally:
        logs.request_id.reset(token)
        log.removeHandler(handler)
    assert buf.getvalue().strip() == "WARNING test.text: slow batch 7 [request_id=abc123]"


def test_start_up_line_names_backbone_device_runtime_store_auth(backbone, tmp_path, captured):
    settings = Settings(
        store=f"file://{tmp_path / 'store'}", runtime="torch", admin_keys="k", pretrained="none"
    )
    with TestClient(create_app(settings, backbone=backbone)) as client:
        assert client.get("/readyz").status_code == 200
    (ready,) = [r for r in lines(captured) if r["msg"].startswith("ready:")]
    assert ready["backbone"] == backbone.model_name and ready["device"] == "cpu"
    assert ready["runtime"] == "torch" and ready["auth"] == "keys"
    assert ready["store"] == f"file://{tmp_path / 'store'}"
    assert ready["fingerprint"] == backbone.fingerprint


def test_start_up_line_hides_the_store_password(backbone, captured, redis_url):
    secret_url = redis_url.replace("redis://", "redis://:hunter2@")
    settings = Settings(store=secret_url, runtime="torch", pretrained="none")
    # Redis without requirepass accepts any password: the replica starts, and says where to
    with TestClient(create_app(settings, backbone=backbone)) as client:
        assert client.get("/readyz").status_code == 200
    assert "hunter2" not in captured.getvalue()
    (ready,) = [r for r in lines(captured) if r["msg"].startswith("ready:")]
    assert ready["store"] == redis_url.replace("redis://", "redis://:***@")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:pw@h/1", "redis://user:***@h/1"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("file://var/store", "file://var/store"),
    ],
)
def test_redact_url(url, shown):
    assert logs.redact_url(url) == shown
