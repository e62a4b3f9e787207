"""CUDA graphs under the prompted forward: one captured graph per (signature, batch bucket).

A batch is padded up to its bucket (1, 2, 4, ... up to the maximum batch), copied into the
graph's static input buffers (images, full-depth biases, deep tokens), replayed, and the rows
that were real are sliced off the static output. Batches larger than the biggest bucket run
eagerly, as do new signatures once `max_graphs` graphs exist. The plain signature is captured
for every bucket at warm-up, before the service reports ready; other signatures are captured on
first use. Capture and replay are injectable (`capture`), so the bucketing, padding, slicing and
fallback logic is tested on the CPU; `cuda_capture` is the real one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.backbones.prompted import Placement

log = logging.getLogger(__name__)

Key = tuple[int, int, str]  # (token depth, tokens per layer, placement), as the ONNX runtime's
Forward = Callable[[dict[str, Tensor]], Tensor]
Replay = Callable[[], Tensor]
Capture = Callable[[Forward, dict[str, Tensor]], Replay]
PLAIN: Key = (0, 0, "append")


def buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below `max_batch`, and `max_batch` itself."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return (*out, max_batch)


def bucket_for(batch: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds `batch`, or None (eager fallback)."""
    return next((b for b in sizes if b >= batch), None)


def cuda_capture(pool: Any = None) -> Capture:
    """The real capture: warm the forward up on a side stream (as torch.cuda.graph requires),
    then record it; all graphs share one memory pool (replays are serialized and each output is
    copied out before the next replay, so sharing is safe and saves memory)."""
    shared = pool if pool is not None else torch.cuda.graph_pool_handle()

    def capture(forward: Forward, static: dict[str, Tensor]) -> Replay:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                forward(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the residency and text-feature threads may use CUDA meanwhile; only
        # this thread's calls must be capture-safe.
        with (
            torch.cuda.graph(graph, pool=shared, capture_error_mode="thread_local"),
            torch.no_grad(),
        ):
            out = forward(static)

        def replay() -> Tensor:
            graph.replay()
            return out

        return replay

    return capture


class CudaGraphRuntime:
    """Replays captured CUDA graphs of the prompted vision forward; eager outside the buckets."""

    name = "cudagraph"

    def __init__(
        self,
        backbone: ClipBackbone,
        max_batch: int,
        *,
        capture: Capture | None = None,
        max_graphs: int = 64,
    ) -> None:
        self.backbone = backbone
        self.sizes = buckets(max_batch)
        self.max_graphs = max_graphs
        self._capture = capture
        self._graphs: dict[tuple[Key, int], tuple[dict[str, Tensor], Replay]] = {}
        self._lock = threading.Lock()
        self.replays = self.fallbacks = 0

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "device": str(self.backbone.device),
            "dtype": str(self.backbone.dtype).removeprefix("torch."),
            "buckets": list(self.sizes),
            "graphs": len(self._graphs),
        }

    def _capturer(self) -> Capture:
        if self._capture is None:
            self._capture = cuda_capture()
        return self._capture

    def _static(self, key: Key, size: int) -> dict[str, Tensor]:
        bb = self.backbone
        image = bb.visual.image_size
        hw = image if isinstance(image, tuple) else (image, image)
        dev, dtype = bb.device, bb.dtype
        static = {
            "images": torch.zeros(size, 3, *hw, device=dev, dtype=dtype),
            "bias": torch.zeros(size, bb.vision_layers, bb.vision_width, device=dev, dtype=dtype),
        }
        depth, n, _ = key
        if depth:
            shape = (size, depth, n, bb.vision_width)
            static["tokens"] = torch.zeros(shape, device=dev, dtype=dtype)
        return static

    def _graph(self, key: Key, size: int) -> tuple[dict[str, Tensor], Replay] | None:
        """The captured graph of (signature, bucket): captured now if new and room is left."""
        found = self._graphs.get((key, size))
        if found is not None or len(self._graphs) >= self.max_graphs:
            return found
        placement: Any = key[2]
        bb = self.backbone

        def forward(s: dict[str, Tensor]) -> Tensor:
            return bb.encode_image(s["images"], s.get("tokens"), s["bias"], placement)

        static = self._static(key, size)
        replay = self._capturer()(forward, static)
        self._graphs[(key, size)] = (static, replay)
        log.info("captured %s at batch %d", key, size)
        return self._graphs[(key, size)]

    def warm_up(self) -> None:
        """Capture the plain signature at every bucket (before the service reports ready)."""
        with self._lock, torch.no_grad():
            for size in reversed(self.sizes):  # largest first: the shared pool is sized once
                self._graph(PLAIN, size)

    def encode(
        self, images: Tensor, tokens: Tensor | None, bias: Tensor | None, placement: Placement
    ) -> Tensor:
        batch = images.shape[0]
        key: Key = PLAIN if tokens is None else (tokens.shape[-3], tokens.shape[-2], placement)
        size = bucket_for(batch, self.sizes)
        with self._lock, torch.no_grad():
            graph = None if size is None else self._graph(key, size)
            if graph is None:
                self.fallbacks += 1
                return self.backbone.encode_image(images, tokens, bias, placement)
            static, replay = graph
            static["images"][:batch].copy_(images)
            static["images"][batch:].zero_()  # padding rows: computed, then dropped
            full = static["bias"]
            full.zero_()
            if bias is not None:
                full[:batch, : bias.shape[-2]].copy_(bias)  # a shared [L, d] broadcasts
            if tokens is not None:
                static["tokens"][:batch].copy_(tokens)
                static["tokens"][batch:].zero_()
            self.replays += 1
            return replay()[:batch].clone()
