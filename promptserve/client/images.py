"""Images in any form a caller has them (a path, encoded bytes, a PIL image, an array), out as
the base64 the API takes. Files and bytes are sent as they are (the server decodes them within
its limits); pixels are encoded as PNG, losslessly."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterable
from typing import Any

ImageInput = Any  # str | os.PathLike | bytes | PIL.Image.Image | numpy-like array


def to_bytes(image: ImageInput) -> bytes:
    """Encoded image bytes from a path, bytes, a PIL image or an `[H, W]` / `[H, W, 3|4]` array
    (uint8, or floats in [0, 1])."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        with open(image, "rb") as f:
            return f.read()
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = _from_array(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _from_array(array: Any) -> Any:
    import numpy as np
    from PIL import Image

    if hasattr(array, "detach"):  # a torch tensor: to the CPU, without its graph
        array = array.detach().cpu().numpy()
    a = np.asarray(array)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"an image array is [H, W] or [H, W, 1|3|4], not {list(a.shape)}")
    if a.dtype.kind == "f":  # floats are taken as [0, 1] intensities
        a = (np.clip(a, 0.0, 1.0) * 255.0).round()
    elif a.dtype.kind not in "ui":
        raise ValueError(f"an image array holds numbers, not {a.dtype}")
    a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a)


def to_base64(images: Iterable[ImageInput]) -> list[str]:
    """Base64 strings, one per image."""
    return [base64.b64encode(to_bytes(image)).decode("ascii") for image in images]


def as_list(images: Any) -> list[ImageInput]:
    """A list of images from one image or a sequence of them (a path string is one image)."""
    if isinstance(images, str | bytes | bytearray | os.PathLike) or hasattr(images, "save"):
        return [images]
    if hasattr(images, "shape"):  # one array, unless a batch [N, H, W, C]
        return list(images) if len(images.shape) == 4 else [images]
    return list(images)
