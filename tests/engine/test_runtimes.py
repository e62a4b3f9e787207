"""Runtimes give eager torch's features: ONNX fp32 within 1e-4, int8 close in direction."""

from __future__ import annotations

import asyncio
import os

import onnxruntime as ort
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


def test_vision_graph_uses_the_fused_attention_op(backbone, onnx_cache):
    import onnx

    rt = OnnxRuntime(backbone, onnx_cache)
    rt.encode(torch.randn(1, 3, 32, 32), None, None, "append")
    ops = [n.op_type for n in onnx.load(str(rt.path((0, 0, "append")))).graph.node]
    assert ops.count("MultiHeadAttention") == backbone.vision_layers
    assert ops.count("Transpose") == 1  # the patch embedding's only: no per-head reshuffles


def test_text_tower_parity(backbone, onnx_cache):
    rt = OnnxRuntime(backbone, onnx_cache)
    ids = backbone.tokenize(["a photo of a cat.", "a", "a blurry photo of a very large red fox."])
    ref = backbone.encode_text_ids(ids)
    got = rt.encode_text_ids(ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-4
    # one graph, dynamic rows and length: a shorter single prompt reuses it
    exports = rt.exports
    one = backbone.tokenize(["x"])
    assert (rt.encode_text_ids(one) - backbone.encode_text_ids(one)).abs().max() <= 1e-4
    assert rt.exports == exports


def test_threads_default_to_physical_cores():
    from service.engine.runtimes.onnx import physical_cores, session_options

    cores = physical_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert session_options(None).intra_op_num_threads == cores
    assert session_options(3).intra_op_num_threads == 3


def test_adhoc_zeroshot_classes_through_the_onnx_text_tower(backbone, classnames, onnx_cache):
    from service.engine.zeroshot_cache import ZeroShotCache

    rt = OnnxRuntime(backbone, onnx_cache)
    templates = ["a photo of a {}.", "a sketch of the {}."]
    ref = asyncio.run(ZeroShotCache(backbone).plan(classnames, templates))
    calls = backbone.text_calls
    got = asyncio.run(
        ZeroShotCache(backbone, text_encoder=rt.encode_text_ids).plan(classnames, templates)
    )
    assert backbone.text_calls == calls  # eager torch's text tower was not used
    assert got.labels == ref.labels
    assert (got.classes - ref.classes).abs().max() <= 1e-4


def test_runtime_selection_and_reasons(backbone, tmp_path):
    from service.engine.runtimes.select import CPU_AUTO_REASON, describe, select_runtime

    rt, why = select_runtime("auto", backbone, cache_dir=str(tmp_path))
    assert rt.name == "torch" and why == CPU_AUTO_REASON  # CPU: ONNX fp32 missed its target
    rt, why = select_runtime("cudagraph", backbone, cache_dir=str(tmp_path))
    assert rt.name == "torch" and "needs a CUDA device" in why
    rt, why = select_runtime("onnx", backbone, cache_dir=str(tmp_path), int8=True)
    assert rt.name == "onnx" and why.endswith("(int8)")
    assert describe(rt, why)["runtime_reason"] == why
    with pytest.raises(ValueError):
        select_runtime("tensorrt", backbone, cache_dir=str(tmp_path))


@pytest.mark.skipif(
    not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs CUDA and onnxruntime-gpu",
)
def test_cuda_execution_provider_with_io_binding(backbone, tmp_path):
    import copy
    from dataclasses import replace

    gpu = replace(
        backbone, model=copy.deepcopy(backbone.model).to("cuda"), device=torch.device("cuda")
    )
    rt = OnnxRuntime(gpu, tmp_path)
    assert rt.describe()["io_binding"] and rt.describe()["providers"][0] == "CUDAExecutionProvider"
    x = torch.randn(3, 3, 32, 32, device="cuda")
    bias = torch.randn(3, 2, gpu.vision_width, device="cuda") * 0.1
    got = rt.encode(x, None, bias, "append")
    assert got.device.type == "cuda"  # bound output: no host round trip
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # eager's patch convolution in true fp32 too
    try:
        assert (got - gpu.encode_image(x, None, bias)).abs().max() <= 1e-4
        ids = gpu.tokenize(["a photo of a cat."])
        assert (rt.encode_text_ids(ids) - gpu.encode_text_ids(ids)).abs().max() <= 1e-4
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def test_graphs_export_from_a_cpu_fp32_copy(backbone, images, tmp_path):
    # A bf16 (or CUDA) backbone cannot be traced with the exporter's CPU float32 example inputs:
    # the graphs come from a CPU fp32 copy of the same weights, and the served backbone is left as
    # it was. The bf16 weights' rounding is in the graph too, so compare with eager on those.
    import copy
    from dataclasses import replace

    half = replace(backbone, model=copy.deepcopy(backbone.model).to(torch.bfloat16))
    half = replace(half, dtype=torch.bfloat16)
    rt = OnnxRuntime(half, tmp_path)
    got = rt.encode(images, None, None, "append")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    rounded = replace(half, model=copy.deepcopy(half.model).float(), dtype=torch.float32)
    assert (got - rounded.encode_image(images)).abs().max() <= 1e-4
    ids = backbone.tokenize(["a photo of a cat."])
    assert (rt.encode_text_ids(ids) - rounded.encode_text_ids(ids)).abs().max() <= 1e-4


CUDA_ORT = pytest.mark.skipif(
    not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs CUDA and onnxruntime-gpu's CUDA execution provider (no GPU on this machine)",
)


def _on_cuda(backbone, dtype=torch.float32):
    import copy
    from dataclasses import replace

    model = copy.deepcopy(backbone.model).to("cuda", dtype)
    return replace(backbone, model=model, device=torch.device("cuda"), dtype=dtype)


@CUDA_ORT
def test_cuda_execution_provider_parity_on_mixed_batches(backbone, classnames, images, tmp_path):
    # Against eager fp32 on the CPU: GPU and CPU fp32 sum in different orders (~1e-5 on this tiny
    # model); 1e-3 still fails any wrong prompt or bias, which moves features by > 1e-2.
    plans = _plans(backbone, classnames)
    ref = encode(backbone, images, plans)
    gpu = _on_cuda(backbone)
    rt = OnnxRuntime(gpu, tmp_path)
    got = encode(gpu, images.cuda(), plans, runtime=rt)
    assert got.device.type == "cuda" and rt.exports == 3
    assert (got.cpu() - ref).abs().max() <= 1e-3


@CUDA_ORT
def test_cuda_execution_provider_serves_a_bf16_backbone(backbone, images, tmp_path):
    # The graph is fp32 (of the bf16-rounded weights): it needs no bf16 support in ORT.
    gpu = _on_cuda(backbone, torch.bfloat16)
    rt = OnnxRuntime(gpu, tmp_path)
    got = rt.encode(images.cuda(), None, None, "append").float().cpu()
    eager = gpu.encode_image(images.cuda()).float().cpu()
    assert F.cosine_similarity(got, eager).min() >= 0.99  # bf16 eager vs fp32 graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU on this machine)")
def test_auto_picks_cuda_graphs_on_a_gpu_and_says_why(backbone, tmp_path):
    from service.engine.runtimes.select import GPU_AUTO_REASON, select_runtime

    rt, why = select_runtime("auto", _on_cuda(backbone), cache_dir=str(tmp_path))
    assert rt.name == "cudagraph" and why == GPU_AUTO_REASON
