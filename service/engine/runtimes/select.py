"""`--runtime auto|torch|onnx`: which runtime serves, and why (logged and shown at /readyz)."""

from __future__ import annotations

import importlib.util
from typing import Any

from service.backbones.clip import ClipBackbone
from service.engine.runtimes.base import Runtime, TorchRuntime


def select_runtime(
    choice: str,
    backbone: ClipBackbone,
    *,
    cache_dir: str,
    threads: int | None = None,
    int8: bool = False,
) -> tuple[Runtime, str]:
    """The runtime for `choice` and the reason it was picked."""
    has_ort = importlib.util.find_spec("onnxruntime") is not None
    if choice == "torch":
        return TorchRuntime(backbone), "asked for by --runtime torch"
    if choice == "onnx" or (choice == "auto" and backbone.device.type == "cpu"):
        if not backbone.is_vit:
            return TorchRuntime(backbone), "the ONNX path exports ViT towers only"
        if not has_ort:
            return TorchRuntime(backbone), "onnxruntime is not installed"
        from service.engine.runtimes.onnx import OnnxRuntime

        why = "asked for by --runtime onnx" if choice == "onnx" else "auto: CPU -> ONNX Runtime"
        return OnnxRuntime(backbone, cache_dir, threads=threads, int8=int8), why
    if choice == "auto":
        return TorchRuntime(backbone), "auto: GPU -> eager torch (CUDA graphs not built yet)"
    raise ValueError(f"unknown runtime {choice!r}")


def describe(runtime: Runtime, reason: str) -> dict[str, Any]:
    return {**runtime.describe(), "runtime_reason": reason}
