"""Hostile and careless clients against a real server (real sockets: slow heads and bodies,
hang-ups and forged log lines live in the HTTP layer, where the test client cannot reach).

The timeouts here are short so the tests are quick; what is asserted is the server's answer
(408, 400, INFO not ERROR), never how long anything took."""

from __future__ import annotations

import json
import struct

import httpx
import pytest

from tests.api.conftest import b64, png
from tests.engine.test_residency import checkpoint
from tests.reliability.live import ADMIN_H, READ, READ_H, read_response, serve, wait_for


@pytest.fixture
def live(backbone, tmp_path):
    with serve(
        backbone,
        f"file://{tmp_path / 'store'}",
        header_timeout_s=1.0,
        body_idle_timeout_s=1.0,
        body_timeout_s=3.0,
        # one batch of one image plus two queued: a crowd counted by admission would be refused
        max_batch_size=1,
        max_queue=2,
    ) as server:
        yield server


def head(path: str, length: int, key: str = READ) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def test_a_head_that_never_ends_gets_408_and_is_closed(live):
    sock = live.connect()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never the blank line
    answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"header_timeout"' in answer
    sock.close()


def test_a_head_trickled_byte_by_byte_still_meets_the_deadline(live):
    """Every byte used to cancel uvicorn's only timer: a client could hold a connection by
    sending one byte now and then. The deadline runs from the connection's start."""
    sock = live.connect()
    sock.settimeout(0.3)
    answer = b""
    for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 200:
        try:
            sock.sendall(bytes([byte]))
            answer += sock.recv(4096)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if answer:
            break
    sock.settimeout(20)
    answer += read_response(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_stalled_bodies_get_408_and_never_count_against_admission(live):
    stalled = []
    for _ in range(20):
        sock = live.connect()
        sock.sendall(head("/v1/classify", 1000) + b'{"images": [')
        stalled.append(sock)
    # all 20 are in the server, still sending their bodies ...
    assert wait_for(lambda: live.metric("promptserve_requests_receiving") == 20)
    # ... and an ordinary request is served: admission (max 3 here) counts only full requests
    ok = httpx.post(
        f"{live.url}/v1/classify",
        headers=READ_H,
        json={"classnames": ["red", "blue"], "images": [b64(png())]},
        timeout=20,
    )
    assert ok.status_code == 200, ok.text
    for sock in stalled:
        answer = read_response(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "body_timeout"
        sock.close()
    assert "ERROR" not in live.log.getvalue()


def test_a_client_hanging_up_mid_body_is_info_not_an_error(live):
    sock = live.connect()
    sock.sendall(head("/v1/classify", 5000) + b'{"images": ["abc')
    assert wait_for(lambda: live.metric("promptserve_requests_receiving") == 1)
    sock.close()
    assert wait_for(lambda: live.metric("promptserve_client_disconnects_total") == 1)
    log = live.log.getvalue()
    assert "left while sending the body of POST /v1/classify" in log
    assert "ERROR" not in log and "Traceback" not in log
    assert live.metric('promptserve_errors_total{code="internal"}') == 0


def test_a_forged_log_line_stays_inside_its_record(live):
    r = httpx.get(f"{live.url}/nothere%0AERROR%20service%3A%20forged%0D", timeout=10)
    assert r.status_code == 404
    # the access line is written after the response is sent: wait for that very line (an
    # earlier wait on "/nothere" alone could match another record first, and raced)
    escaped = "/nothere\\nERROR service: forged\\r"
    assert wait_for(lambda: escaped in live.log.getvalue())
    lines = live.log.getvalue().splitlines()
    assert not any(line.startswith("ERROR") for line in lines), lines[-5:]


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    "path, headers, kwargs",
    [
        ("/v1/classify", READ_H, {"content": DEEP}),
        ("/v1/classify", READ_H, {"content": '{"images": ' + "[" * 50 + "]" * 50 + "}"}),
        ("/v1/embed", READ_H, {"content": DEEP}),
        ("/v1/checkpoints/x/activate", ADMIN_H, {"content": DEEP}),
        ("/v1/jobs", ADMIN_H, {"content": DEEP}),
        ("/v1/classify", READ_H, {"data": {"classnames": "[abc"}, "files": {"images": b"x"}}),
        ("/v1/classify", READ_H, {"data": {"classnames": "[" * 5000}, "files": {"images": b"x"}}),
    ],
)
def test_malformed_or_deep_json_is_a_4xx_never_a_500(live, path, headers, kwargs):
    if "content" in kwargs:
        headers = {**headers, "content-type": "application/json"}
    r = httpx.post(f"{live.url}{path}", headers=headers, timeout=20, **kwargs)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert r.json()["error"]["code"] in ("bad_request", "invalid_request")
    assert "Traceback" not in live.log.getvalue()


def test_an_upload_whose_header_is_deep_json_is_a_422(live, backbone):
    header = ("[" * 20_000 + "]" * 20_000).encode()
    blob = struct.pack("<Q", len(header)) + header
    r = httpx.post(
        f"{live.url}/v1/checkpoints",
        headers=ADMIN_H,
        files={"file": ("deep.safetensors", blob)},
        timeout=20,
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "malformed_checkpoint"
    good = checkpoint(backbone)
    r = httpx.post(
        f"{live.url}/v1/checkpoints", headers=ADMIN_H, files={"file": ("c.st", good)}, timeout=20
    )
    assert r.status_code == 201  # and the server is unharmed


def test_a_body_of_millions_of_tiny_values_is_refused_before_parsing(live):
    """Within the size limit, `[[],[],...]` is millions of Python objects for whoever parses
    it; the values are bounded from the bytes before any parser runs, on every JSON route."""
    body = "[" + "[]," * 400_000 + "[]]"
    for path, headers in (("/v1/classify", READ_H), ("/v1/embed", READ_H), ("/v1/jobs", ADMIN_H)):
        r = httpx.post(
            f"{live.url}{path}",
            content=body,
            headers={**headers, "content-type": "application/json"},
            timeout=20,
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_values", r.text


def test_a_connection_that_sends_nothing_is_closed_quietly(live):
    """No 408 where no request was begun: it could cross one the client is just sending."""
    sock = live.connect()
    assert read_response(sock) == b""  # closed by the server, without an answer
    sock.close()
