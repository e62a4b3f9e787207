"""The front-end half of classify and embed: admission, deadlines, the image count, decoding.

What runs before the engine sees a request, in the process that holds its connection: requests
are counted in (429 at once when full, before the body is parsed or an image decoded), given a
deadline at arrival, checked for their image count (THE check), and their images decoded
(bounded, allow-listed) and preprocessed into a tensor, or, when the engine decodes on its
device, handed over as bytes after every check their headers allow.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from service import errors
from service.engine.control import ControlBlock
from service.engine.protocol import AdHoc, EngineClient, ImageInput, Images
from service.engine.zeroshot_cache import adhoc_key
from service.images import (
    ImageLimits,
    PixelBudget,
    decode_base64,
    decode_batch,
    request_pixels,
)
from service.settings import Settings

MAX_TEXT = 1000  # characters per text to embed


@dataclass
class FrontEnd:
    """Per-process request bounds and image preparation for the classify and embed routes."""

    engine: EngineClient
    image_input: ImageInput
    limits: ImageLimits
    max_images: int
    timeout_s: float
    # Admission: requests between arrival and answer (reading, decoding, queued, computing).
    # Bounded so a crowd is refused at once, before its bodies are parsed and its images
    # decoded; the batcher's own queue bound alone came too late (decoding waits in the thread
    # pool), which made 429s take seconds under overload (bench/load.py). 0: unbounded.
    max_admitted: int = 0
    admitted: int = 0
    # ... and by time: refused when the work already admitted would take longer than this to
    # compute (admitted x the engine's measured seconds per request), so accepted requests
    # wait about this long at most whatever the model's speed. 0: off.
    max_queue_wait_s: float = 0.0
    # Decoded pixels: per request (413 beyond) and in flight in the process (429 beyond).
    max_request_pixels: int = 100_000_000
    pixels: PixelBudget | None = None
    # PROMPTSERVE_JPEG_DRAFT: JPEGs decoded at the DCT scale that still covers the model's side
    draft: bool = False
    max_adhoc_classes: int = 1000
    # With several front ends (--frontends N), each publishes its admitted count in the
    # control block and admission by time counts the work of all of them: the engine is one.
    board: ControlBlock | None = None
    index: int = 0

    @classmethod
    def of(
        cls, settings: Settings, engine: EngineClient, board: ControlBlock | None = None,
        index: int = 0,
    ) -> FrontEnd:  # fmt: skip
        """The front end the settings describe, preparing images as `engine` wants them."""
        return cls(
            board=board,
            index=index,
            engine=engine,
            image_input=engine.image_input(),
            limits=ImageLimits.of(settings),
            max_images=settings.max_images,
            timeout_s=settings.request_timeout_s,
            max_admitted=settings.max_queue + settings.max_batch_size,
            max_queue_wait_s=settings.max_queue_wait_s,
            max_request_pixels=settings.max_request_pixels,
            pixels=PixelBudget(settings.max_decode_pixels),
            draft=settings.jpeg_draft,
            max_adhoc_classes=settings.max_adhoc_classes,
        )

    def deadline(self) -> float:
        """The deadline of a request arriving now: everything it costs counts against it."""
        return time.monotonic() + self.timeout_s

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Count a request in for its lifetime, or refuse it at once with 429 (event loop only)."""
        if self.max_admitted and self.admitted >= self.max_admitted:
            raise errors.Overloaded(
                f"server overloaded: {self.admitted} requests in progress; retry with backoff"
            )
        per = self.engine.load().seconds_per_request
        ahead = self.total_admitted()
        if self.max_queue_wait_s and per and ahead * per > self.max_queue_wait_s:
            raise errors.Overloaded(
                f"server overloaded: about {ahead * per:.1f} s of work ahead "
                f"({ahead} requests); retry with backoff"
            )
        self._count(+1)
        try:
            yield
        finally:
            self._count(-1)

    def total_admitted(self) -> int:
        """Requests admitted and not yet answered, by every front end of the service."""
        return self.board.admitted() if self.board is not None else self.admitted

    def _count(self, delta: int) -> None:
        self.admitted += delta
        if self.board is not None:
            self.board.set_admitted(self.index, self.admitted)

    def check_count(self, n: int) -> None:
        """THE image-count check: at least one image, at most `max_images`."""
        if n == 0:
            raise errors.BadRequest("no images in the request; send at least one")
        if n > self.max_images:
            raise errors.TooManyImages(
                f"{n} images in one request; at most {self.max_images} (split the request)"
            )

    def check_texts(self, texts: Sequence[str]) -> None:
        """Texts to embed: non-empty, at most MAX_TEXT characters each."""
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip() or len(t) > MAX_TEXT:
                raise errors.BadRequest(
                    f"text #{i} must be a non-empty string of <= {MAX_TEXT} chars"
                )

    def check_adhoc(self, adhoc: AdHoc) -> None:
        """Ad-hoc class names and templates are valid (4xx before any image is decoded)."""
        adhoc_key(adhoc.classnames, adhoc.templates, self.max_adhoc_classes)

    def decode(self, items: Sequence[str | bytes]) -> Images:
        """Base64 strings or raw bytes (counted already) -> what the engine takes: the
        preprocessed batch, or the bytes for its device decoder (run in a worker thread)."""
        blobs = [decode_base64(i, self.limits) if isinstance(i, str) else i for i in items]
        preprocess = self.image_input.preprocess
        if preprocess is None:
            # device memory is bounded by the device path's own chunks; the request's total here
            request_pixels(blobs, self.limits, self.max_request_pixels)
            return tuple(blobs)
        return decode_batch(
            blobs,
            self.limits,
            preprocess,
            max_request_pixels=self.max_request_pixels,
            budget=self.pixels,
            draft=self.image_input.side if self.draft else None,
        )
