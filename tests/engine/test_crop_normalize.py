"""The front ends of --frontends N send uint8 crops and the engine normalizes them: the model's
input must be the very numbers the one-process path (open_clip's full transform) makes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from service.backbones.clip import normalizer, transform_of

CONFIGS = [
    {"size": (224, 224), "mode": "RGB", "mean": (0.48145466, 0.4578275, 0.40821073),
     "std": (0.26862954, 0.26130258, 0.27577711), "interpolation": "bicubic",
     "resize_mode": "shortest", "fill_color": 0},
    {"size": (32, 32), "mode": "RGB", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
     "interpolation": "bilinear", "resize_mode": "squash", "fill_color": 0},
]  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mode,size", [("RGB", (300, 200)), ("L", (64, 97)), ("RGBA", (224, 224))])
def test_crop_then_normalize_is_the_full_transform_bit_for_bit(config, mode, size):
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
    full = transform_of(config)(image)
    crop = transform_of(config, crop_only=True)(image)
    assert crop.dtype == torch.uint8 and crop.shape == full.shape
    # the same float operations in the same order: equal, not close
    assert torch.equal(normalizer(config)(crop[None])[0], full)


def test_the_batcher_normalizes_uint8_batches_as_the_front_end_would():
    """The engine process hands uint8 crops to the batcher, whose worker normalizes the whole
    batch (classifier.encode_batch): the same features as the batch normalized beforehand."""
    from service.backbones.clip import load_clip
    from service.engine.classifier import PLAIN_PLAN, encode_batch
    from service.engine.runtimes.base import TorchRuntime
    from tests.conftest import TINY_CONFIG

    bb = load_clip("", "none", model_config=TINY_CONFIG)
    normalize = normalizer(bb.preprocess_config())
    crops = torch.randint(0, 256, (3, 3, *bb.image_size), dtype=torch.uint8)
    plans = [PLAIN_PLAN] * 3
    runtime = TorchRuntime(bb)
    got = encode_batch(bb, normalize, crops, plans, runtime)
    want = encode_batch(bb, normalize, normalize(crops), plans, runtime)
    assert torch.equal(got, want)  # the same input numbers, so the same output bits
