"""Shared fixtures: a tiny open_clip architecture registered in-test (no download, ever)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from service.backbones.clip import ClipBackbone, load_clip
from tests.redis_server import RedisServer, _start_server

TINY_CONFIG = Path(__file__).with_name("tiny_clip.json")
CLASSNAMES = ["cat", "dog", "red_car", "sea turtle"]


@pytest.fixture(scope="session")
def backbone() -> ClipBackbone:
    """A 3-layer ViT / 3-layer text CLIP with random (seeded) weights, float32 on the CPU."""
    torch.manual_seed(0)
    return load_clip("", "none", model_config=TINY_CONFIG)


@pytest.fixture(scope="session")
def other_backbone() -> ClipBackbone:
    """The same architecture with different weights: a different fingerprint."""
    torch.manual_seed(1)
    return load_clip("", "none", model_config=TINY_CONFIG)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.fixture
def classnames() -> list[str]:
    return list(CLASSNAMES)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session (tests that kill it use `private_redis`)."""
    server = _start_server(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session server, emptied for this test."""
    with contextlib.closing(redis_server.client()) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for this test alone, free to kill and restart."""
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = _start_server(workdir)
    yield server
    server.kill()
