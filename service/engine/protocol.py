"""The seam between the HTTP front end and the engine: small values, and `EngineClient`.

The front end (service/api) does auth, admission, parsing, validation, image decode and
preprocessing, and formatting; the engine resolves checkpoint references to plans, builds ad-hoc
zero-shot plans, batches, encodes, and turns logits into top-k results. Everything that crosses
is a plain value below (strings, numbers, tensors, bytes), never a plan, a model or a callback
(but `ImageInput.preprocess`, see there), so the same calls can later travel between processes:
`InProcess` (engine/core.py) calls the engine directly; a multi-process client would send these
values over a socket and the images through shared memory (engine/shm.py). Deadlines are
`time.monotonic()` values: one clock for every process of a machine (CLOCK_MONOTONIC).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image
from torch import Tensor

from service.backbones.base import Capability
from service.checkpoints.publish import Published

# Preprocessed images `[N, 3, H, W]` (float, CPU), or the compressed bytes when the engine
# decodes on its device (PROMPTSERVE_IMAGE_DECODE=gpu): then only bytes cross the seam.
Images = Tensor | tuple[bytes, ...]


@dataclass(frozen=True)
class AdHoc:
    """Plain zero-shot over class names given with the request."""

    classnames: tuple[str, ...]
    templates: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ClassifyWork:
    """One classify request: images under each named checkpoint, or under ad-hoc classes."""

    request_id: str
    refs: tuple[str, ...]  # checkpoint references, `name` or `name@version`; () with `adhoc`
    adhoc: AdHoc | None
    images: Images
    top_k: int
    deadline: float  # time.monotonic() value: the request's time from arrival


@dataclass(frozen=True)
class ClassifyResult:
    """One classifier's answer: per image, `(label, probability)` best first."""

    checkpoint: str | None  # None for ad-hoc zero-shot
    version: int | None
    method: str
    predictions: tuple[tuple[tuple[str, float], ...], ...]


@dataclass(frozen=True)
class EmbedWork:
    """Normalized embeddings of images (plain, or under a checkpoint's vision prompts) and texts."""

    request_id: str
    ref: str | None
    images: Images | None
    texts: tuple[str, ...]
    deadline: float


@dataclass(frozen=True)
class EmbedResult:
    checkpoint: str | None
    version: int | None
    images: Tensor | None  # [N, e] float32, CPU
    texts: Tensor | None  # [T, e] float32, CPU


@dataclass(frozen=True)
class Load:
    """What admission and /metrics need to know of the engine's work in progress."""

    queue_depth: int  # requests waiting for the encoder
    seconds_per_request: float | None  # measured compute per request at the traffic's batches


@dataclass(frozen=True)
class ImageInput:
    """How the engine wants its images. In process, `preprocess` is the backbone's own transform;
    a front end in another process builds the same transform from the model's preprocessing
    config. None: the engine decodes on its device, send the compressed bytes."""

    preprocess: Callable[[Image.Image], Tensor] | None
    side: int  # the model's input side (the JPEG draft scale's target)


class EngineClient(Protocol):
    """Every call the HTTP routes make into the engine (the answer routes excepted: see
    docs/ARCHITECTURE.md). Errors are `service.errors` classes, statuses from the one table."""

    @property
    def capabilities(self) -> frozenset[Capability]:
        """What the served backbone can do (routes of other capabilities answer 404)."""
        ...

    def describe(self) -> dict[str, str]:
        """What /readyz shows: backbone, runtime, image decode."""
        ...

    def image_input(self) -> ImageInput:
        """How the front end prepares images for `classify` and `embed`."""
        ...

    def load(self) -> Load:
        """The engine's work in progress (admission by time, queue-depth gauge)."""
        ...

    @property
    def ready(self) -> bool:
        """Whether calls can be answered now (false while an engine process restarts)."""
        ...

    def health(self) -> dict[str, Any]:
        """The store's state and the resident checkpoints (/readyz)."""
        ...

    def stats(self) -> dict[str, float]:
        """What /metrics reads live: residency counters, `resident`, `store_up`,
        `queue_depth` (service/metrics.py)."""
        ...

    async def residents(self) -> dict[str, Any]:
        """The checkpoint versions in memory per tier, the tiers' budgets and use, and the version
        of each name being served (GET /v1/residency)."""
        ...

    async def classify(self, work: ClassifyWork) -> list[ClassifyResult]:
        """One result per classifier the work names, in its order (a repeated ref once)."""
        ...

    async def embed(self, work: EmbedWork) -> EmbedResult:
        """Image and text embeddings."""
        ...

    async def publish(self, data: bytes, activate: bool) -> Published:
        """Validate checkpoint bytes against the served backbone, then store them."""
        ...

    async def labels(self, ref: str) -> tuple[str, ...]:
        """The class names of a checkpoint version (loading it if needed)."""
        ...

    def forget(self, name: str) -> None:
        """Drop a deleted checkpoint from this engine at once (others hear the store's event)."""
        ...
