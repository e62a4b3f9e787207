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
    if choice == "auto":
        # Measured (bench/runtimes.py, docs/PERFORMANCE.md): ONNX fp32 beats eager at batch 1
        # (1.28x) but loses at batch 32 (0.88x), where a loaded server runs; until the fast path
        # wins at every batch size, auto keeps eager torch. int8 ONNX is 2.1-3.2x, opt-in.
        return TorchRuntime(backbone), "auto: eager torch (ONNX fp32 is slower at large batches)"
    if choice == "onnx":
        if not backbone.is_vit:
            return TorchRuntime(backbone), "the ONNX path exports ViT towers only"
        if not has_ort:
            return TorchRuntime(backbone), "onnxruntime is not installed"
        from service.engine.runtimes.onnx import OnnxRuntime

        why = "asked for by --runtime onnx" + (" (int8)" if int8 else "")
        return OnnxRuntime(backbone, cache_dir, threads=threads, int8=int8), why
    raise ValueError(f"unknown runtime {choice!r}")


def describe(runtime: Runtime, reason: str) -> dict[str, Any]:
    return {**runtime.describe(), "runtime_reason": reason}
