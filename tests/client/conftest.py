"""A real served app for the client: the tiny backbone behind uvicorn on 127.0.0.1, keys on, a
file store, and local training jobs (their child loads the same weights from a file)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.app import create_app
from service.settings import Settings
from tests.conftest import TINY_CONFIG
from tests.procs import save_weights
from tests.served import serve

ADMIN, READ = "client-admin-key", "client-read-key"


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("client-server")


@pytest.fixture(scope="module")
def url(backbone, server_dir: Path) -> Iterator[str]:
    weights = save_weights(backbone, server_dir / "tiny.safetensors")
    settings = Settings(
        model="",
        model_config_path=str(TINY_CONFIG),
        pretrained=str(weights),
        store=f"file://{server_dir / 'store'}",
        runtime="torch",
        api_keys=READ,
        admin_keys=ADMIN,
        runs_dir=str(server_dir / "runs"),
    )
    with serve(create_app(settings, backbone=backbone)) as base:
        yield base
