"""Runtimes give eager torch's features: ONNX fp32 within 1e-4, int8 close in direction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.engine.forward import encode
from service.engine.runtimes.base import TorchRuntime
from service.engine.runtimes.onnx import OnnxRuntime
from service.prompts import get_method


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


def _plans(backbone, classnames):
    out = []
    for method, config, seed in (
        ("maple", {"depth": 2}, 0),
        ("maple", {"depth": 2}, 1),
        ("bias", {}, 2),
        ("zeroshot", {}, 0),
        ("vpt", {}, 3),
    ):
        m = get_method(method)
        cfg = m.config(config)
        params = {
            k: v + 0.05 * torch.randn_like(v)
            for k, v in m.init(backbone, cfg, classnames, seed=seed).items()
        }
        out.append(m.materialize(params, backbone, cfg, classnames))
    return out


def test_onnx_fp32_parity_on_mixed_batches(backbone, classnames, images, onnx_cache):
    rt = OnnxRuntime(backbone, onnx_cache)
    plans = _plans(backbone, classnames)
    eager = encode(backbone, images, plans)
    ours = encode(backbone, images, plans, runtime=rt)
    assert (ours - eager).abs().max() <= 1e-4
    assert rt.exports == 3  # plain (+bias), MaPLe 2x2, VPT: one graph per signature
    # raw features too, for every placement and a lone bias
    tokens = torch.randn(len(images), 2, 3, backbone.vision_width)
    bias = torch.randn(len(images), 2, backbone.vision_width) * 0.1
    for placement in ("append", "prepend"):
        ref = backbone.encode_image(images, tokens, bias, placement)
        got = rt.encode(images, tokens, bias, placement)
        assert (got - ref).abs().max() <= 1e-4


def test_dynamic_batch_and_disk_cache(backbone, onnx_cache):
    rt = OnnxRuntime(backbone, onnx_cache)
    for batch in (1, 3, 8):
        x = torch.randn(batch, 3, 32, 32)
        assert (rt.encode(x, None, None, "append") - backbone.encode_image(x)).abs().max() <= 1e-4
    again = OnnxRuntime(backbone, onnx_cache)
    again.encode(torch.randn(2, 3, 32, 32), None, None, "append")
    assert again.exports == 0  # reused from disk
    assert rt.path((0, 0, "append")).name.startswith(
        "vision-" + backbone.fingerprint.removeprefix("sha256:")[:16]
    )


def test_int8_is_close_in_direction(backbone, images, tmp_path):
    rt = OnnxRuntime(backbone, tmp_path, int8=True)
    got = F.normalize(rt.encode(images, None, None, "append"), dim=-1)
    ref = F.normalize(backbone.encode_image(images), dim=-1)
    assert (got * ref).sum(-1).min() >= 0.99
    assert "int8" in rt.path((0, 0, "append")).name


def test_torch_runtime_is_the_backbone(backbone, images):
    rt = TorchRuntime(backbone)
    assert torch.equal(rt.encode(images, None, None, "append"), backbone.encode_image(images))
    assert rt.describe()["runtime"] == "torch"
