"""Image decode and preprocessing on the backbone's device: nvJPEG for JPEG batches, torch ops
for resize, crop and normalize, the exact CPU path (PIL + open_clip's transform) per image for
everything nvJPEG is not trusted with.

Why: on a GPU host PIL decode + resize + normalize cost 1-14 ms of CPU per image (224x224 to
1280x960 JPEG), which caps a CPU-bound front end far below what the GPU encodes.

Order of work per request, so that bad input costs no GPU time and gets the same 4xx as on the
CPU path: base64 and every header check first (`service.images.open_header`: bytes, allowed
format, pixel count from the header), then the routing decision from the header alone
(`nvjpeg_takes`), then one `torchvision.io.decode_jpeg(list, device=...)` call per chunk of
routed JPEGs, then the resize. Anything nvJPEG refuses at decode time is decoded again by the
CPU path, which raises the one table's error for the image that is really broken (or serves it).

The resize matches torchvision's `Resize(size)` on a PIL image (what open_clip's eval transform
does): shortest side to `size` with the same output-size arithmetic, PIL's antialiased bicubic
(torch's `antialias=True` kernels use PIL's a = -0.5 and support) in PIL's two 8-bit passes,
then `CenterCrop` with the same rounding, `/ 255` and the backbone's
mean/std. The same code runs on CPU tensors, which is how its parity with the exact path is
tested on machines without a GPU (torchvision's CPU decoder is libjpeg-turbo, as PIL's is).

torchvision's image decoders are deprecated since 0.29 in favour of TorchCodec (>= 0.16, same
`decode_jpeg(..., device="cuda")` call); the one call sits in `decode_jpegs` so the move is one
function. NVIDIA's nvImageCodec was not measured here (no GPU in the session that wrote this).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import get_model_preprocess_cfg
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from service.backbones.clip import ClipBackbone
from service.images import ImageLimits, decode_base64, open_header, open_image

log = logging.getLogger(__name__)

# Start-of-frame markers nvJPEG gets: baseline and extended sequential Huffman (8-bit). Progressive
# (0xC2), lossless and arithmetic-coded JPEGs take the CPU path: nvJPEG's support for them depends
# on the backend torchvision picks and has not been checked on a GPU here (bench/gpu.py's decode
# probe reports it; widen this set from its figures).
NVJPEG_FRAMES = frozenset({0xC0, 0xC1})
# Decode at most this many pixels at once (uint8, 3 channels: ~400 MB), and resize groups of
# same-sized images up to this many pixels (float32: 4x that): a request of 64 images at the
# 40 MP limit must not need 8 GB of device memory at one time.
DECODE_PIXELS = 2**27
RESIZE_PIXELS = 2**25
_SOS, _EOI = 0xDA, b"\xff\xd9"


def jpeg_frame(data: bytes) -> tuple[int, int] | None:
    """(start-of-frame marker, offset of the first start-of-scan) from walking the JPEG's marker
    segments, or None when the walk fails. A few dozen bytes are read, never the scan data."""
    pos, frame, n = 2, 0, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == _SOS:
            return (frame, pos) if frame else None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT/JPG/DAC)
            frame = marker
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def nvjpeg_takes(img: Image.Image, data: bytes) -> bool:
    """Whether the device decodes this image the way the CPU path would, judged from the header:
    an 8-bit 3-component YCbCr JPEG (not CMYK, greyscale or Adobe-RGB-coded), baseline or
    extended sequential, upright (EXIF orientation 1 or none: the CPU path rotates, nvJPEG does
    not), and complete: an end-of-image marker after the first scan (a truncated file goes to
    the CPU path, whose decoder refuses it with the usual error)."""
    if img.format != "JPEG" or img.mode != "RGB" or img.info.get("adobe_transform") == 0:
        return False
    if "exif" in img.info and img.getexif().get(0x0112, 1) != 1:
        return False
    found = jpeg_frame(data)
    if found is None or found[0] not in NVJPEG_FRAMES:
        return False
    return data.rfind(_EOI, found[1]) > found[1]


def output_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision `Resize(size)`'s output for one int: the shorter side becomes `size`, the
    longer one `int(size * long / short)` (truncated, as torchvision does)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize_crop_normalize(
    images: Sequence[Tensor],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
) -> Tensor:
    """uint8 `[3, H, W]` images (any sizes, one device) -> float `[N, 3, size, size]`, as
    open_clip's eval transform makes them from PIL images (see the module docstring)."""
    device = images[0].device
    out = torch.empty(len(images), 3, size, size, device=device)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault((int(img.shape[1]), int(img.shape[2])), []).append(i)
    for (h, w), idx in by_shape.items():
        nh, nw = output_size(h, w, size)
        top, left = round((nh - size) / 2.0), round((nw - size) / 2.0)  # CenterCrop's rounding
        step = max(1, RESIZE_PIXELS // (h * w))
        for start in range(0, len(idx), step):
            part = idx[start : start + step]
            x = torch.stack([images[i] for i in part]).float()
            # PIL resamples in two passes, horizontal then vertical, each stored in 8 bits
            # (rounded, clipped); one 2-D pass in float differs by up to 4 levels on noisy
            # images, two passes by at most 1. A side that keeps its size is not resampled.
            if nw != w:
                x = F.interpolate(x, size=(h, nw), mode=interpolation, antialias=True)
                x = x.round_().clamp_(0, 255)
            if nh != h:
                x = F.interpolate(x, size=(nh, nw), mode=interpolation, antialias=True)
                x = x.round_().clamp_(0, 255)
            out[torch.tensor(part, device=device)] = x[:, :, top : top + size, left : left + size]
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return out.div_(255).sub_(m).div_(s)


def decode_jpegs(datas: Sequence[bytes], device: torch.device) -> list[Tensor]:
    """JPEG bytes -> uint8 `[3, H, W]` RGB tensors on `device` (nvJPEG on CUDA, one batched call;
    libjpeg-turbo on the CPU). Raises RuntimeError when the decoder refuses any of them."""
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, list) else [out]


def unsupported(cfg: dict[str, Any]) -> str | None:
    """Why the torch ops cannot reproduce this backbone's preprocessing, or None."""
    size = cfg.get("size")
    square = isinstance(size, int) or (isinstance(size, tuple) and len(set(size)) == 1)
    if not square:
        return f"non-square input size {size}"
    if cfg.get("resize_mode", "shortest") != "shortest":
        return f"resize_mode {cfg.get('resize_mode')!r} (only 'shortest' is reproduced)"
    if cfg.get("interpolation", "bicubic") not in ("bicubic", "bilinear"):
        return f"interpolation {cfg.get('interpolation')!r}"
    if cfg.get("mode", "RGB") != "RGB":
        return f"colour mode {cfg.get('mode')!r}"
    return None


class GpuImages:
    """Request images -> the preprocessed batch on the backbone's device (see the module doc)."""

    def __init__(self, backbone: ClipBackbone) -> None:
        cfg = get_model_preprocess_cfg(backbone.model)
        problem = unsupported(cfg)
        if problem:
            raise ValueError(f"device preprocessing cannot reproduce this backbone's: {problem}")
        size = cfg["size"]
        self.size = int(size if isinstance(size, int) else size[0])
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.interpolation = str(cfg.get("interpolation", "bicubic"))
        self.preprocess = backbone.preprocess  # the exact CPU path, for the images routed there
        self.device = backbone.device
        self.refused = 0  # routed JPEGs the device decoder refused (decoded again on the CPU)

    def probe(self) -> None:
        """Decode one small JPEG on the device: a torchvision built without nvJPEG fails here, at
        start, not on a request."""
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
        decode_jpegs([buf.getvalue()], self.device)

    def decode(self, items: Sequence[str | bytes], limits: ImageLimits) -> Tensor:
        """Base64 strings or raw bytes -> preprocessed `[N, 3, S, S]` float batch on the device."""
        out: list[Tensor | None] = [None] * len(items)
        routed: list[tuple[int, bytes, int]] = []  # (index, bytes, pixels) for the device
        for i, item in enumerate(items):
            data = decode_base64(item, limits) if isinstance(item, str) else item
            with open_header(data, limits) as img:  # every 4xx the header can prove
                device_ok = nvjpeg_takes(img, data)
                pixels = img.size[0] * img.size[1]
            if device_ok:
                routed.append((i, data, pixels))
            else:
                out[i] = self._on_cpu(data, limits)
        for chunk in _chunks(routed, DECODE_PIXELS):
            try:
                decoded = decode_jpegs([d for _, d, _ in chunk], self.device)
            except RuntimeError as err:
                # One refusal fails the whole call (no partial results): the CPU path decodes
                # this chunk again and raises the table's error for the broken image, if any.
                self.refused += len(chunk)
                log.warning("device JPEG decoder refused a batch (%s); decoding it on the CPU", err)
                for i, data, _ in chunk:
                    out[i] = self._on_cpu(data, limits)
                continue
            batch = resize_crop_normalize(
                decoded, self.size, self.mean, self.std, self.interpolation
            )
            for row, (i, _, _) in enumerate(chunk):
                out[i] = batch[row]
        return torch.stack([t for t in out if t is not None])

    def _on_cpu(self, data: bytes, limits: ImageLimits) -> Tensor:
        return self.preprocess(open_image(data, limits)).to(self.device)


def _chunks(
    routed: list[tuple[int, bytes, int]], budget: int
) -> list[list[tuple[int, bytes, int]]]:
    chunks: list[list[tuple[int, bytes, int]]] = []
    total = budget
    for entry in routed:
        if total + entry[2] > budget:
            chunks.append([])
            total = 0
        chunks[-1].append(entry)
        total += entry[2]
    return chunks


def select_image_decode(choice: str, backbone: ClipBackbone) -> tuple[GpuImages | None, str]:
    """`--image-decode auto|cpu|gpu`: the device decoder to use (None: the CPU path) and why."""
    on_gpu = backbone.device.type == "cuda"
    if choice == "cpu":
        return None, "cpu: PIL + open_clip's transform (asked for)"
    if choice == "auto" and not on_gpu:
        return None, "auto: PIL + open_clip's transform (the backbone is on the CPU)"
    if choice not in ("auto", "gpu"):
        raise ValueError(f"unknown image_decode {choice!r}")
    try:
        images = GpuImages(backbone)
        if on_gpu:
            images.probe()
    except (ValueError, RuntimeError) as err:
        if choice == "gpu":
            raise ValueError(f"image_decode=gpu is not possible here: {err}") from err
        return None, f"auto: PIL + open_clip's transform ({err})"
    if not on_gpu:
        return images, (
            "gpu on a CPU backbone: the device path's code with torchvision's CPU JPEG decoder "
            "(for tests of that code; the exact path is image_decode=cpu)"
        )
    return images, f"{choice}: nvJPEG decode, resize and normalize on {backbone.device}"
