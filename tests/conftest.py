"""Shared fixtures: a tiny open_clip architecture registered in-test (no download, ever)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.backbones.clip import ClipBackbone, load_clip

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
