"""A real served app for tests whose behaviour lives in the HTTP layer: uvicorn on a loopback
port in a thread of this process (the tiny backbone, our server configuration from
`service.server`), its log lines captured, raw sockets for clients that misbehave."""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from service import logs, server
from service.app import create_app
from service.backbones.clip import ClipBackbone
from service.settings import Settings
from tests.procs import free_port

ADMIN, READ = "admin-key-123", "read-key-456"
READ_H = {"Authorization": f"Bearer {READ}"}
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}


class Live:
    """The running server: its URL, its app, and what it logged."""

    def __init__(self, url: str, app: Any, log: io.StringIO) -> None:
        self.url, self.app, self.log = url, app, log
        self.port = int(url.rsplit(":", 1)[1])

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=20)
        return sock

    def metric(self, name: str) -> float:
        """The value of one sample of /metrics (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics", headers=READ_H, timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll until true (a bound for a broken build, not a measurement)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@contextmanager
def serve(backbone: ClipBackbone, store: str, **overrides: Any) -> Iterator[Live]:
    """The app on a real socket until the block ends; logs in text format into a buffer."""
    base: dict[str, Any] = {
        "store": store,
        "model": "tiny_clip",
        "pretrained": "none",
        "runtime": "torch",
        "api_keys": READ,
        "admin_keys": ADMIN,
        "port": free_port(),
    }
    settings = Settings(**{**base, **overrides})
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    logs.configure("text", "INFO")
    (ours,) = [h for h in root.handlers if h.get_name() == "promptserve"]
    buffer = io.StringIO()
    ours.stream = buffer  # type: ignore[attr-defined]
    app = create_app(settings, backbone=backbone)
    uv = uvicorn.Server(server.config(app, settings))
    thread = threading.Thread(target=uv.run, name="live-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    try:
        ready = wait_for(lambda: _ready(url), timeout=60)
        assert ready, f"server not ready: {buffer.getvalue()[-2000:]}"
        yield Live(url, app, buffer)
    finally:
        uv.should_exit = True
        thread.join(30)
        root.handlers[:], root.level = saved


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or 20 s pass)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
