"""ONNX Runtime under the prompted forward: prompt tokens and biases are graph *inputs*.

One exported graph serves every checkpoint of a signature and mixed-checkpoint batches, with a
dynamic batch axis; nothing is re-exported per checkpoint. Biases are always an input of full
depth (zeros where a plan has none: a no-op), so bias-only and text-only plans share the plain
graph. Exports are cached on disk, keyed by the backbone fingerprint, the signature and the
versions of torch, onnx and onnxruntime. Optional int8 dynamic quantization for CPU serving.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from service.backbones import prompted
from service.backbones.clip import ClipBackbone
from service.backbones.prompted import Placement

log = logging.getLogger(__name__)

Key = tuple[int, int, str]  # (token depth, tokens per layer, placement); (0, 0, "append") plain


class _PromptedVision(nn.Module):
    """What gets exported: the vision tower with tokens and biases as inputs."""

    def __init__(self, visual: nn.Module, placement: Placement, with_tokens: bool) -> None:
        super().__init__()
        self.visual, self.placement, self.with_tokens = visual, placement, with_tokens

    def forward(self, images: Tensor, bias: Tensor, tokens: Tensor | None = None) -> Tensor:
        return prompted.encode_image(self.visual, images, tokens, bias, self.placement)


def session_options(threads: int | None) -> ort.SessionOptions:
    """Deliberate settings: all graph optimizations, a memory arena, intra-op threads = cores
    (ORT's default spins extra threads that only contend on a small machine), sequential
    execution (a ViT is one chain of ops: parallel execution buys nothing)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_cpu_mem_arena = True
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    return opts


class OnnxRuntime:
    """Runs the prompted vision tower through ONNX Runtime sessions, one per signature."""

    name = "onnx"

    def __init__(
        self,
        backbone: ClipBackbone,
        cache_dir: str | Path,
        *,
        threads: int | None = None,
        int8: bool = False,
    ) -> None:
        self.backbone, self.cache_dir, self.int8 = backbone, Path(cache_dir), int8
        self.threads = threads
        self.providers = [
            p
            for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in ort.get_available_providers()
            and (p != "CUDAExecutionProvider" or backbone.device.type == "cuda")
        ]
        self._sessions: dict[Key, ort.InferenceSession] = {}
        self._lock = threading.Lock()
        self.exports = 0

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "int8": self.int8,
            "providers": self.providers,
            "graphs": len(self._sessions),
        }

    # --- graphs --------------------------------------------------------------------------------
    def path(self, key: Key) -> Path:
        depth, n, placement = key
        versions = f"torch{torch.__version__}-onnx{onnx.__version__}-ort{ort.__version__}"
        fp = self.backbone.fingerprint.removeprefix("sha256:")[:16]
        kind = "int8" if self.int8 else "fp32"
        return self.cache_dir / f"vision-{fp}-{depth}x{n}-{placement}-{kind}-{versions}.onnx"

    def session(self, key: Key) -> ort.InferenceSession:
        """The session of a signature: from the cache on disk, or exported now (once)."""
        with self._lock:
            sess = self._sessions.get(key)
            if sess is None:
                path = self.path(key)
                if not path.exists():
                    self._export(key, path)
                sess = ort.InferenceSession(
                    str(path), session_options(self.threads), providers=self.providers
                )
                self._sessions[key] = sess
            return sess

    def _export(self, key: Key, path: Path) -> None:
        depth, n, placement = key
        bb = self.backbone
        start = time.perf_counter()
        module = _PromptedVision(bb.visual, placement, depth > 0).eval()  # type: ignore[arg-type]
        size = bb.visual.image_size
        hw = size if isinstance(size, tuple) else (size, size)
        images = torch.randn(2, 3, *hw)
        bias = torch.zeros(2, bb.vision_layers, bb.vision_width)
        batch = torch.export.Dim("batch", min=1, max=4096)
        args: tuple[Tensor, ...] = (images, bias)
        shapes: dict[str, Any] = {"images": {0: batch}, "bias": {0: batch}}
        names = ["images", "bias"]
        if depth:
            args = (*args, torch.randn(2, depth, n, bb.vision_width) * 0.02)
            shapes["tokens"] = {0: batch}
            names.append("tokens")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fp32 = tmp.with_suffix(".fp32.tmp") if self.int8 else tmp
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(fp32),
                input_names=names,
                output_names=["features"],
                dynamic_shapes=shapes,
                dynamo=True,
                optimize=True,
                external_data=False,
                verbose=False,
            )
        if self.int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8)
            fp32.unlink(missing_ok=True)
        tmp.replace(path)  # atomic: a concurrent or crashed export never leaves a torn graph
        self.exports += 1
        log.info("exported %s in %.1f s", path.name, time.perf_counter() - start)

    # --- the contract --------------------------------------------------------------------------
    def encode(
        self, images: Tensor, tokens: Tensor | None, bias: Tensor | None, placement: Placement
    ) -> Tensor:
        bb = self.backbone
        batch = images.shape[0]
        key: Key = (
            (0, 0, "append") if tokens is None else (tokens.shape[-3], tokens.shape[-2], placement)
        )
        full = torch.zeros(batch, bb.vision_layers, bb.vision_width)
        if bias is not None:
            b = bias if bias.dim() == 3 else bias.unsqueeze(0).expand(batch, -1, -1)
            full[:, : b.shape[1]] = b.float().cpu()
        feed = {"images": images.float().cpu().contiguous().numpy(), "bias": full.numpy()}
        if tokens is not None:
            t = tokens if tokens.dim() == 4 else tokens.unsqueeze(0).expand(batch, -1, -1, -1)
            feed["tokens"] = t.float().cpu().contiguous().numpy()
        out = self.session(key).run(["features"], feed)[0]
        return torch.from_numpy(out)
