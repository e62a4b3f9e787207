"""An app on the tiny backbone with a fresh file store per test, driven by httpx (TestClient)."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.engine.test_residency import checkpoint

ADMIN, READ = "admin-key-123", "read-key-456"


def png(size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def make_client(backbone, tmp_path) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        # eager torch unless a test asks: an ONNX export per app would slow every API test
        overrides.setdefault("runtime", "torch")
        settings = Settings(
            store=f"file://{tmp_path / 'store'}", model="tiny_clip", pretrained="none", **overrides
        )
        client = TestClient(create_app(settings, backbone=backbone))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


@pytest.fixture
def upload(backbone) -> Callable[..., Any]:
    def do(client: TestClient, name: str = "eurosat", seed: int = 0, headers=None, **kw: Any):
        blob = checkpoint(backbone, name=name, seed=seed, **kw)
        return client.post(
            "/v1/checkpoints", files={"file": (f"{name}.safetensors", blob)}, headers=headers or {}
        )

    return do


def store_state(client: TestClient) -> dict[str, Any]:
    """What the store holds (names, versions, pointers), to assert nothing changed."""
    store = client.app.state.store
    return {n: (store.current(n), [v.version for v in store.versions(n)]) for n in store.names()}
