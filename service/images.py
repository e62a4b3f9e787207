"""Bounded, allow-listed image decoding: base64 text or raw bytes in, a loaded RGB image out.

Every limit is checked on the cheapest thing that can prove it: the length of a base64 string
before it is decoded, the byte count before Pillow sees the bytes, and the pixel count from the
header before a single pixel is decoded. Only the allowed formats' parsers ever run, and every
failure is one of the request-content errors in `service.errors`, never a Pillow exception.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from service.errors import (
    ImageTooLarge,
    InvalidBase64,
    InvalidImage,
    Overloaded,
    PromptServeError,
    UnsupportedImageFormat,
)

if TYPE_CHECKING:
    from service.settings import Settings

# Leading bytes of the formats we allow: a file that starts like one of them but that Pillow
# cannot identify is a broken JPEG/PNG/WebP (InvalidImage), not an unsupported format.
_SIGNATURES = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "WEBP": (b"RIFF",),  # checked together with b"WEBP" at offset 8, below
}
_ALPHABET_HINT = "use the standard alphabet (A-Z a-z 0-9 + /) with '=' padding"


@dataclass(frozen=True)
class ImageLimits:
    """What one request image may be: encoded size, pixel count (from the header), formats."""

    max_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")

    @classmethod
    def of(cls, settings: Settings) -> ImageLimits:
        """The limits the settings set (PROMPTSERVE_MAX_IMAGE_BYTES, _MAX_IMAGE_PIXELS)."""
        return cls(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)

    def __post_init__(self) -> None:
        # An unknown name would surface as a KeyError deep inside Image.open, on a request.
        Image.init()
        unknown = [f for f in self.formats if f not in Image.OPEN]
        if unknown or not self.formats:
            raise ValueError(f"image formats {unknown or '()'} are not readable by Pillow")


def decode_base64(text: str, limits: ImageLimits) -> bytes:
    """Decode plain base64 or a `data:...;base64,` URI, refusing oversize input before decoding."""
    # Cheap bound before copying anything: line breaks may at most double a legitimate payload,
    # and a data-URI prefix is short.
    max_chars = 4 * -(-limits.max_bytes // 3)
    if len(text) > 2 * max_chars + 256:
        raise _too_many_bytes(len(text) * 3 // 4, limits)
    if text[:5].lower() == "data:":
        comma = text.find(",", 0, 256)  # media types are short; never scan a huge string
        if comma < 0 or not text[:comma].lower().endswith(";base64"):
            raise InvalidBase64("a data URI must look like 'data:image/png;base64,<data>'")
        # The declared media type is not trusted: the bytes' own header decides the format.
        text = text[comma + 1 :]
    if not text.isascii():
        raise InvalidBase64(
            f"image is not valid base64: it has non-ASCII characters; {_ALPHABET_HINT}"
        )
    compact = "".join(text.split())  # MIME-style line breaks are common in clients
    if not compact:
        raise InvalidBase64("image is empty: send the image bytes as base64")
    padding = 2 if compact.endswith("==") else 1 if compact.endswith("=") else 0
    decoded_size = len(compact) * 3 // 4 - padding
    if decoded_size > limits.max_bytes:
        raise _too_many_bytes(decoded_size, limits)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidBase64(f"image is not valid base64 ({err}); {_ALPHABET_HINT}") from None


def open_header(data: bytes, limits: ImageLimits) -> Image.Image:
    """Every check that needs no pixel decoded (bytes, allowed format, header, pixel count);
    returns the opened, not yet loaded image (the caller closes it)."""
    # A global set elsewhere would make truncated uploads decode as grey padding: refuse loudly.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False in this service")
    if len(data) > limits.max_bytes:
        raise _too_many_bytes(len(data), limits)
    if not data:
        raise InvalidImage("image is empty (0 bytes)")
    allowed = ", ".join(limits.formats)
    try:
        # `formats` keeps every other parser (TIFF, PSD, EPS/Ghostscript, ...) from ever running.
        # Pillow's own bomb check raises (over 2x MAX_IMAGE_PIXELS) or warns (over 1x); we do not
        # turn the warning into an error with warnings.catch_warnings(): that swaps process-wide
        # filters and is not thread-safe. Our own pixel check below refuses those sizes anyway.
        img = Image.open(BytesIO(data), formats=list(limits.formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLarge(
            f"image header claims too many pixels ({err}); send a smaller image"
        ) from None
    except UnidentifiedImageError:
        if _looks_like(data, limits.formats):
            raise InvalidImage("image header is corrupt: it could not be read") from None
        raise UnsupportedImageFormat(
            f"image format is not supported; send one of: {allowed}"
        ) from None
    except Exception as err:
        raise InvalidImage(f"image could not be read ({type(err).__name__})") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise InvalidImage(f"image header claims an empty size {width}x{height}")
    pixel_cap = min(limits.max_pixels, Image.MAX_IMAGE_PIXELS or limits.max_pixels)
    if width * height > pixel_cap:
        img.close()
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{pixel_cap}; downscale it before sending"
        )
    return img


def header_pixels(data: bytes, limits: ImageLimits) -> int:
    """Pixels the image will decode to, from its header alone (every limit checked)."""
    with open_header(data, limits) as img:
        width, height = img.size
        return int(width * height)


def open_image(data: bytes, limits: ImageLimits, draft: int | None = None) -> Image.Image:
    """Decode allow-listed image bytes into a fully loaded RGB image, within `limits`.

    At most one full-size copy of the pixels is made (a colour conversion, when needed): the
    EXIF rotation is applied in place and an RGB image is returned as decoded. With `draft`, a
    JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= `draft`
    pixels: several times faster on large photos, but not the reference preprocessing (opt-in,
    PROMPTSERVE_JPEG_DRAFT; its effect on embeddings is in docs/PERFORMANCE.md).
    """
    img = open_header(data, limits)
    try:
        if draft is not None and img.format == "JPEG":
            img.draft("RGB", (draft, draft))
        # Animated WebP/PNG: open() leaves the first frame current and load() decodes only
        # that one, so we classify the first frame.
        img.load()
        _upright(img)
        rgb = _to_rgb(img)
    except PromptServeError:
        img.close()
        raise
    except Exception as err:  # truncated or corrupt data; never leak a Pillow exception
        img.close()
        raise InvalidImage(
            f"image data is truncated or corrupt ({type(err).__name__}: {err})"
        ) from None
    if rgb is not img:
        img.close()
    return rgb


class PixelBudget:
    """Decoded pixels alive at once in this process, across requests and decode threads.

    A decoded image costs about 4 bytes per pixel (Pillow keeps RGB as 32-bit pixels; a colour
    conversion, when the file is not RGB, briefly doubles that); the budget bounds what
    concurrent decodes can hold together. Exhausted, it refuses at once (429, Retry-After)
    instead of queueing memory.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity, self.used = capacity, 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self._lock:
            if self.used + pixels > self.capacity:
                raise Overloaded(
                    f"server busy decoding images ({self.used} of {self.capacity} pixels in "
                    "flight); retry with backoff"
                )
            self.used += pixels
        try:
            yield
        finally:
            with self._lock:
                self.used -= pixels


def request_pixels(items: Sequence[bytes], limits: ImageLimits, max_total: int) -> list[int]:
    """Each image's pixels from its header (every limit checked), the request's total bounded
    by `max_total` (413), before any pixel is decoded."""
    sizes = [header_pixels(data, limits) for data in items]
    if (total := sum(sizes)) > max_total:
        raise ImageTooLarge(
            f"the images of this request total {total} pixels, over the limit of "
            f"{max_total} per request; send fewer or smaller images"
        )
    return sizes


def decode_batch(
    items: Sequence[bytes],
    limits: ImageLimits,
    preprocess: Callable[[Image.Image], torch.Tensor],
    *,
    max_request_pixels: int,
    budget: PixelBudget | None = None,
    draft: int | None = None,
) -> torch.Tensor:
    """Image bytes -> preprocessed `[N, 3, H, W]`, one image alive at full size at a time.

    Every header is read (and every limit checked) before any pixel is decoded; the request's
    total is bounded by `max_request_pixels` (413), and each decode holds its pixels from the
    process-wide `budget` (429 when exhausted). Each image becomes its model-sized tensor as
    soon as it is decoded, so the full-size copies never pile up.
    """
    if not items:
        raise ValueError("decode_batch needs at least one image")
    sizes = request_pixels(items, limits, max_request_pixels)
    out = None
    for i, (data, pixels) in enumerate(zip(items, sizes, strict=True)):
        with budget.hold(pixels) if budget is not None else contextlib.nullcontext():
            tensor = _model_input(data, limits, preprocess, draft)
        if out is None:
            out = tensor.new_empty(len(items), *tensor.shape)
        elif tensor.shape != out.shape[1:]:
            raise ValueError(
                f"preprocess returned {list(tensor.shape)} after {list(out.shape[1:])}"
            )
        out[i] = tensor
    assert out is not None
    return out


def _model_input(
    data: bytes,
    limits: ImageLimits,
    preprocess: Callable[[Image.Image], torch.Tensor],
    draft: int | None = None,
) -> torch.Tensor:
    # Its own frame, so the decoded image is freed as soon as the tensor exists.
    tensor = preprocess(open_image(data, limits, draft))
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"preprocess must return [3, H, W], got {list(tensor.shape)}")
    return tensor


def _too_many_bytes(size: int, limits: ImageLimits) -> ImageTooLarge:
    return ImageTooLarge(
        f"image is about {size} bytes, over the limit of {limits.max_bytes} bytes; "
        "send a smaller or more compressed image"
    )


def _looks_like(data: bytes, formats: tuple[str, ...]) -> bool:
    for fmt in formats:
        if any(data.startswith(sig) for sig in _SIGNATURES.get(fmt, ())):
            return fmt != "WEBP" or data[8:12] == b"WEBP"
    return False


def _upright(img: Image.Image) -> None:
    """Apply the EXIF orientation in place (no copy of the pixels when there is none)."""
    # A malformed EXIF block should not cost the user a decodable image: keep it as stored.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(img, in_place=True)


def _to_rgb(img: Image.Image) -> Image.Image:
    # 16/32-bit greyscale (16-bit PNG): scale to 8 bits; a plain convert would clip at 255.
    if img.mode.startswith("I") or img.mode == "F":
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    # Transparency is composited on white rather than dropped: dropping alpha exposes whatever
    # colour the encoder left under transparent pixels (often black), which misleads CLIP.
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")
