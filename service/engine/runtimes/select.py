"""`--runtime auto|torch|onnx|cudagraph`: which runtime serves, and why (logged, at /readyz)."""

from __future__ import annotations

import importlib.util
from typing import Any

from service.backbones.clip import ClipBackbone
from service.engine.runtimes.base import Runtime, TorchRuntime

# Measured with bench/runtimes.py (docs/PERFORMANCE.md): ONNX fp32 with the fused-attention
# export runs ViT-B/32 at 0.91-1.06x eager torch at batch 32 on 2 cores (1.2-1.35x at batch 1),
# short of the >= 1.1x the issue sets for making it the CPU default. Eager torch is already at
# ~87-90% of the measured fp32 matmul rate there, so an fp32 graph runtime has little to win.
CPU_AUTO_REASON = (
    "auto: eager torch on the CPU (ONNX fp32 measured 0.91-1.06x eager at batch 32, below the 1.1x "
    "that would make it the default; --runtime onnx opts in, PROMPTSERVE_ONNX_INT8 for int8)"
)

# On a GPU, CUDA graphs: they replay the backbone in its serving precision (bf16 ViT-B/32 at
# batch 32: 21,193 img/s on an H100, 6.3x eager fp32, docs/PERFORMANCE.md). The ONNX graphs are
# fp32 with TF32 off (the parity the tests hold), so the CUDA execution provider can at best
# approach the fp32 rate at large batches; at batch 1 it might beat eager. It has not yet run on
# a GPU: bench/gpu.py measures it beside CUDA graphs and eager; revisit this with its figures.
GPU_AUTO_REASON = (
    "auto: CUDA graphs on the GPU (they replay the backbone in its precision: bf16 ViT-B/32 "
    "measured 6.3x eager fp32 at batch 32; the ONNX CUDA execution provider runs an fp32 graph and "
    "is not yet measured on a GPU, see bench/gpu.py; --runtime onnx opts in)"
)


def select_runtime(
    choice: str,
    backbone: ClipBackbone,
    *,
    cache_dir: str,
    threads: int | None = None,
    int8: bool = False,
    max_batch: int = 32,
) -> tuple[Runtime, str]:
    """The runtime for `choice` and the reason it was picked."""
    on_gpu = backbone.device.type == "cuda"
    if choice == "torch":
        return TorchRuntime(backbone), "asked for by --runtime torch"
    if not backbone.is_vit:
        return TorchRuntime(backbone), f"{choice}: the fast paths serve ViT towers only"
    if choice == "auto":
        if on_gpu:
            return _cudagraph(backbone, max_batch), GPU_AUTO_REASON
        return TorchRuntime(backbone), CPU_AUTO_REASON
    if choice == "cudagraph":
        if not on_gpu:
            return TorchRuntime(backbone), "cudagraph needs a CUDA device: eager torch instead"
        return _cudagraph(backbone, max_batch), "asked for by --runtime cudagraph"
    if choice == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            return TorchRuntime(backbone), "onnxruntime is not installed"
        from service.engine.runtimes.onnx import OnnxRuntime

        why = "asked for by --runtime onnx" + (" (int8)" if int8 else "")
        return OnnxRuntime(backbone, cache_dir, threads=threads, int8=int8), why
    raise ValueError(f"unknown runtime {choice!r}")


def _cudagraph(backbone: ClipBackbone, max_batch: int) -> Runtime:
    from service.engine.runtimes.cudagraph import CudaGraphRuntime

    return CudaGraphRuntime(backbone, max_batch)


def describe(runtime: Runtime, reason: str) -> dict[str, Any]:
    return {**runtime.describe(), "runtime_reason": reason}
