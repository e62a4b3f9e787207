"""Bounded, allow-listed decoding: every input is generated here (Pillow, struct, zlib)."""

from __future__ import annotations

import base64
import io
import pickle
import struct
import time
import zlib
from typing import Any

import pytest
import torch
from PIL import Image, ImageFile

from service import errors
from service.backbones.clip import ClipBackbone
from service.images import ImageLimits, PixelBudget, decode_base64, decode_batch, open_image

LIMITS = ImageLimits()


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def gradient(size: tuple[int, int] = (48, 32), mode: str = "RGB") -> Image.Image:
    """A smooth image (so lossy codecs keep its colours close) of the given size and mode."""
    w, h = size
    rgb = Image.merge(
        "RGB",
        (
            Image.linear_gradient("L").resize(size),
            Image.linear_gradient("L").rotate(90).resize(size),
            Image.new("L", size, 128),
        ),
    )
    assert rgb.size == (w, h)
    return rgb.convert(mode)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_bomb(width: int, height: int) -> bytes:
    """A hand-made PNG whose IHDR claims width x height RGB pixels; its IDAT holds one row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def jpeg_sof_offset(data: bytes) -> int:
    """Offset of the SOF0 segment's marker, found by walking the marker segments."""
    pos = 2  # after SOI
    while pos < len(data):
        assert data[pos] == 0xFF, "lost marker sync"
        marker = data[pos + 1]
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker == 0xC0:
            return pos
        pos += 2 + length
    raise AssertionError("no SOF0 marker")


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(gradient((16, 16)), "JPEG"))
    sof = jpeg_sof_offset(bytes(data))
    # SOF0: FF C0, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def no_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any pixel decode fail the test: proves a refusal came from the header alone."""

    def forbidden(self: Any) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", forbidden)


def assert_error(exc: pytest.ExceptionInfo[errors.PromptServeError], cls: type, code: str) -> None:
    assert type(exc.value) is cls
    assert exc.value.code == code
    assert exc.value.message


# --- valid images --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_valid_formats_decode_to_rgb(fmt: str, mode: str) -> None:
    src = gradient((48, 32), mode)
    img = open_image(encode(src, fmt), LIMITS)
    assert img.mode == "RGB"
    assert img.size == (48, 32)
    # Colours survive (loosely for lossy codecs): the centre pixel is near the source's.
    got = img.getpixel((24, 16))
    want = src.convert("RGB").getpixel((24, 16))
    assert isinstance(got, tuple) and isinstance(want, tuple)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 12


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_rgba_is_composited_on_white(fmt: str) -> None:
    src = Image.new("RGBA", (20, 10), (255, 0, 0, 0))  # fully transparent red
    src.paste((0, 0, 255, 255), (10, 0, 20, 10))  # right half opaque blue
    img = open_image(encode(src, fmt, lossless=True) if fmt == "WEBP" else encode(src, fmt), LIMITS)
    assert img.mode == "RGB" and img.size == (20, 10)
    assert img.getpixel((2, 5)) == (255, 255, 255)
    assert img.getpixel((15, 5)) == (0, 0, 255)


def test_palette_png_with_and_without_transparency() -> None:
    src = gradient((30, 20)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img = open_image(encode(src, "PNG"), LIMITS)
    assert img.mode == "RGB" and img.size == (30, 20)
    assert img.getpixel((3, 3)) == src.convert("RGB").getpixel((3, 3))

    index = src.getpixel((0, 0))
    transparent = encode(src, "PNG", transparency=index)
    img = open_image(transparent, LIMITS)
    assert img.getpixel((0, 0)) == (255, 255, 255)


def test_grayscale_alpha_png() -> None:
    src = Image.new("LA", (8, 8), (40, 255))
    src.putpixel((0, 0), (40, 0))
    img = open_image(encode(src, "PNG"), LIMITS)
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((5, 5)) == (40, 40, 40)


def test_16_bit_png_is_scaled_not_clipped() -> None:
    src = Image.new("I;16", (12, 6), 32768)  # mid-grey in 16 bits
    data = encode(src, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    img = open_image(data, LIMITS)
    assert img.mode == "RGB" and img.size == (12, 6)
    assert img.getpixel((1, 1)) == (128, 128, 128)  # clipping would give 255


def test_cmyk_jpeg() -> None:
    img = open_image(encode(gradient((16, 8), "CMYK"), "JPEG"), LIMITS)
    assert img.mode == "RGB" and img.size == (16, 8)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(gradient((40, 20)), "JPEG", exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    assert open_image(data, LIMITS).size == (20, 40)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_images_give_the_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    params: dict[str, Any] = {"save_all": True, "append_images": frames[1:], "duration": 50}
    if fmt == "WEBP":
        params["lossless"] = True
    data = encode(frames[0], fmt, **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    img = open_image(data, LIMITS)
    assert img.size == (16, 16)
    assert img.getpixel((8, 8)) == (255, 0, 0)


@pytest.mark.parametrize("prefix", ["", "data:image/png;base64,", "DATA:image/png;BASE64,"])
def test_base64_round_trip(prefix: str) -> None:
    data = encode(gradient((10, 10)), "PNG")
    text = prefix + base64.b64encode(data).decode()
    assert decode_base64(text, LIMITS) == data
    assert open_image(decode_base64(text, LIMITS), LIMITS).size == (10, 10)


def test_base64_with_line_breaks() -> None:
    data = encode(gradient((10, 10)), "PNG")
    text = base64.encodebytes(data).decode()  # MIME: a newline every 76 characters
    assert "\n" in text.strip()
    assert decode_base64("  " + text + "\r\n", LIMITS) == data


# --- decompression bombs: refused from the header, no pixel decoded -------------------------------


def test_png_bomb_refused_from_header(monkeypatch: pytest.MonkeyPatch) -> None:
    data = png_bomb(100_000, 100_000)
    no_decode(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(errors.ImageTooLarge) as exc:
        open_image(data, LIMITS)
    assert time.perf_counter() - start < 1.0
    assert_error(exc, errors.ImageTooLarge, "image_too_large")


def test_jpeg_bomb_refused_from_header(monkeypatch: pytest.MonkeyPatch) -> None:
    data = jpeg_claiming(65_000, 65_000)
    no_decode(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(errors.ImageTooLarge) as exc:
        open_image(data, LIMITS)
    assert time.perf_counter() - start < 1.0
    assert_error(exc, errors.ImageTooLarge, "image_too_large")


def test_our_pixel_limit_is_below_pillows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A size Pillow would accept (no bomb error, no warning) is refused by our own limit."""
    data = png_bomb(5000, 5000)  # 25M pixels: under Pillow's 89M, over this limit
    no_decode(monkeypatch)
    with pytest.raises(errors.ImageTooLarge) as exc:
        open_image(data, ImageLimits(max_pixels=1_000_000))
    assert_error(exc, errors.ImageTooLarge, "image_too_large")
    assert "5000x5000" in exc.value.message


def test_limit_above_pillows_still_bounded_by_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    no_decode(monkeypatch)
    with pytest.raises(errors.ImageTooLarge) as exc, pytest.warns(Image.DecompressionBombWarning):
        open_image(png_bomb(40, 40), ImageLimits(max_pixels=10**9))  # 1,600: warns in Pillow
    assert_error(exc, errors.ImageTooLarge, "image_too_large")
    with pytest.raises(errors.ImageTooLarge) as exc:
        open_image(png_bomb(100, 100), ImageLimits(max_pixels=10**9))  # over 2x: Pillow raises
    assert_error(exc, errors.ImageTooLarge, "image_too_large")


def test_image_at_the_pixel_limit_is_accepted() -> None:
    img = open_image(encode(gradient((50, 20)), "PNG"), ImageLimits(max_pixels=1000))
    assert img.size == (50, 20)


# --- truncated and corrupt ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_images_are_invalid(fmt: str) -> None:
    data = encode(gradient((64, 64)), fmt)
    with pytest.raises(errors.InvalidImage) as exc:
        open_image(data[: len(data) // 2], LIMITS)
    assert_error(exc, errors.InvalidImage, "invalid_image")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png_data_is_invalid() -> None:
    data = bytearray(encode(gradient((64, 64)), "PNG"))
    middle = len(data) // 2
    data[middle : middle + 16] = b"\x00" * 16
    with pytest.raises(errors.InvalidImage) as exc:
        open_image(bytes(data), LIMITS)
    assert_error(exc, errors.InvalidImage, "invalid_image")


def test_corrupt_png_header_is_invalid_not_unsupported() -> None:
    data = bytearray(png_bomb(16, 16))
    data[20] ^= 0xFF  # inside IHDR: its CRC no longer matches
    with pytest.raises(errors.InvalidImage) as exc:
        open_image(bytes(data), LIMITS)
    assert_error(exc, errors.InvalidImage, "invalid_image")


def test_corrupt_jpeg_is_invalid() -> None:
    data = bytearray(encode(gradient((64, 64)), "JPEG"))
    sof = jpeg_sof_offset(bytes(data))
    data[sof + 9] = 0  # zero components: libjpeg refuses the frame
    with pytest.raises(errors.InvalidImage) as exc:
        open_image(bytes(data), LIMITS)
    assert_error(exc, errors.InvalidImage, "invalid_image")


def test_corrupt_jpeg_scan_is_invalid() -> None:
    data = encode(gradient((64, 64)), "JPEG")
    cut = data.index(b"\xff\xda")  # start of scan: keep the headers, replace the entropy data
    with pytest.raises(errors.InvalidImage) as exc:
        open_image(data[:cut] + b"\xff\xda" + b"\xff" * 64, LIMITS)
    assert_error(exc, errors.InvalidImage, "invalid_image")


def test_load_truncated_images_must_stay_off(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(gradient((64, 64)), "PNG")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        open_image(data[: len(data) // 2], LIMITS)


def test_empty_bytes_are_invalid() -> None:
    with pytest.raises(errors.InvalidImage) as exc:
        open_image(b"", LIMITS)
    assert_error(exc, errors.InvalidImage, "invalid_image")


# --- off the allow-list ---------------------------------------------------------------------------


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'
OFF_LIST = {
    "gif": lambda: encode(gradient((16, 16)), "GIF"),
    "bmp": lambda: encode(gradient((16, 16)), "BMP"),
    "tiff": lambda: encode(gradient((16, 16)), "TIFF"),
    "ico": lambda: encode(gradient((16, 16)), "ICO"),
    "pdf": lambda: encode(gradient((16, 16)), "PDF"),
    "text": lambda: b"hello, this is a text file\n",
    "pickle": lambda: pickle.dumps({"a": [1, 2, 3]}),
    "svg": lambda: SVG,
    "random": lambda: bytes(range(256)) * 4,
}


@pytest.mark.parametrize("kind", sorted(OFF_LIST))
def test_formats_off_the_allow_list_are_unsupported(kind: str) -> None:
    with pytest.raises(errors.UnsupportedImageFormat) as exc:
        open_image(OFF_LIST[kind](), LIMITS)
    assert_error(exc, errors.UnsupportedImageFormat, "unsupported_image_format")
    assert "JPEG, PNG, WEBP" in exc.value.message


def test_allow_list_is_configurable() -> None:
    data = encode(gradient((16, 16)), "WEBP")
    with pytest.raises(errors.UnsupportedImageFormat) as exc:
        open_image(data, ImageLimits(formats=("JPEG", "PNG")))
    assert_error(exc, errors.UnsupportedImageFormat, "unsupported_image_format")
    with pytest.raises(ValueError):
        ImageLimits(formats=("NOPE",))


# --- byte limits ----------------------------------------------------------------------------------


def test_bytes_over_the_limit() -> None:
    data = encode(gradient((64, 64)), "PNG")
    with pytest.raises(errors.ImageTooLarge) as exc:
        open_image(data, ImageLimits(max_bytes=len(data) - 1))
    assert_error(exc, errors.ImageTooLarge, "image_too_large")
    assert open_image(data, ImageLimits(max_bytes=len(data))).size == (64, 64)


@pytest.mark.parametrize("prefix", ["", "data:image/png;base64,"])
def test_huge_base64_refused_without_decoding(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("base64 was decoded")

    monkeypatch.setattr(base64, "b64decode", forbidden)
    text = prefix + "A" * (50 * 2**20)
    start = time.perf_counter()
    with pytest.raises(errors.ImageTooLarge) as exc:
        decode_base64(text, ImageLimits(max_bytes=2**20))
    assert time.perf_counter() - start < 0.5
    assert_error(exc, errors.ImageTooLarge, "image_too_large")


def test_base64_size_boundary() -> None:
    limits = ImageLimits(max_bytes=300)
    assert len(decode_base64(base64.b64encode(b"x" * 300).decode(), limits)) == 300
    for size in (301, 302, 303):  # each padding length, one byte or more over
        with pytest.raises(errors.ImageTooLarge) as exc:
            decode_base64(base64.b64encode(b"x" * size).decode(), limits)
        assert_error(exc, errors.ImageTooLarge, "image_too_large")


# --- invalid base64 -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "QUJD$EVG",  # a character outside the alphabet
        "QUJDREVG-_",  # URL-safe alphabet
        "QUJDRA",  # missing padding
        "QUJDRA=",  # wrong padding
        "QQ==QQ==",  # padding in the middle
        "QUJDRA==é",  # non-ASCII
        "QUJD\u2028REVG",  # non-ASCII whitespace
        "",
        "   \n  ",
        "data:image/png;base64,",
        "data:image/png,QUJD",  # not a base64 data URI
        "data:image/png;base64",  # no comma
    ],
)
def test_invalid_base64(text: str) -> None:
    with pytest.raises(errors.InvalidBase64) as exc:
        decode_base64(text, LIMITS)
    assert_error(exc, errors.InvalidBase64, "invalid_base64")


# --- batching -------------------------------------------------------------------------------------


def simple_preprocess(img: Image.Image) -> torch.Tensor:
    small = img.convert("RGB").resize((32, 32))
    raw = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8)
    return raw.view(32, 32, 3).permute(2, 0, 1).float() / 255


def test_decode_batch_with_a_simple_preprocess() -> None:
    blobs = [encode(gradient(s), "PNG") for s in [(48, 32), (10, 60)]]
    batch = decode_batch(blobs, LIMITS, simple_preprocess, max_request_pixels=10**6)
    assert batch.shape == (2, 3, 32, 32)
    assert torch.equal(batch[1], simple_preprocess(open_image(blobs[1], LIMITS)))


def test_decode_batch_with_open_clip_preprocess(backbone: ClipBackbone) -> None:
    preprocess = backbone.preprocess  # the tiny CLIP from conftest: 32x32 inputs
    blobs = [encode(gradient((40, 30)), fmt) for fmt in ("PNG", "JPEG")]
    blobs.append(encode(gradient((33, 70)), "WEBP"))
    batch = decode_batch(blobs, LIMITS, preprocess, max_request_pixels=10**6)
    assert batch.shape == (3, 3, 32, 32)
    assert batch.dtype == torch.float32
    # bit-identical to preprocessing the decoded image: the exact path is unchanged
    assert torch.equal(batch[2], preprocess(open_image(blobs[2], LIMITS)))


def test_decode_batch_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        decode_batch([], LIMITS, simple_preprocess, max_request_pixels=10**6)
    with pytest.raises(ValueError):
        decode_batch(
            [encode(gradient((4, 4)), "PNG")],
            LIMITS,
            lambda img: torch.zeros(1, 4, 4),
            max_request_pixels=10**6,
        )


def test_the_request_total_is_checked_from_headers_before_any_decode() -> None:
    """Two images within the per-image limit whose sum is over the request's: 413 before a pixel
    is decoded (the preprocess would record a call)."""
    calls: list[int] = []

    def counting(img: Image.Image) -> torch.Tensor:
        calls.append(1)
        return simple_preprocess(img)

    blobs = [encode(gradient((100, 100)), "PNG")] * 2
    with pytest.raises(errors.ImageTooLarge) as exc:
        decode_batch(blobs, LIMITS, counting, max_request_pixels=15_000)
    assert_error(exc, errors.ImageTooLarge, "image_too_large")
    assert "total 20000 pixels" in exc.value.message and calls == []


def test_the_process_budget_refuses_at_once_and_is_released() -> None:
    budget = PixelBudget(15_000)
    blob = encode(gradient((100, 100)), "PNG")
    with budget.hold(10_000), pytest.raises(errors.Overloaded):
        decode_batch([blob], LIMITS, simple_preprocess, max_request_pixels=10**6, budget=budget)
    assert budget.used == 0
    decode_batch([blob, blob], LIMITS, simple_preprocess, max_request_pixels=10**6, budget=budget)
    assert budget.used == 0  # one image held at a time, each released after its tensor exists


# --- the exact path is unchanged by the memory work (issue 14) -----------------------------------


def reference_rgb(data: bytes) -> Image.Image:
    """The decode before issue 14, in effect: every copy it made, no shortcut."""
    import contextlib
    import io

    from PIL import ImageOps

    img = Image.open(io.BytesIO(data))
    img.load()
    with contextlib.suppress(Exception):
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I") or img.mode == "F":
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def test_decoding_is_bit_identical_to_the_pipeline_before_for_every_kind(backbone) -> None:
    """EXIF rotation now happens in place and an RGB image is no longer copied: the pixels the
    model sees must not change, for every kind of file (turned, alpha, palette, 16-bit, CMYK)."""
    turned = gradient((64, 40))
    exif = turned.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate
    palette = gradient((30, 20)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    items = [
        encode(gradient((48, 32)), "PNG"),
        encode(gradient((48, 32)), "JPEG"),
        encode(turned, "JPEG", exif=exif.tobytes()),
        encode(gradient((33, 70), "RGBA"), "PNG"),
        encode(gradient((40, 30), "LA"), "PNG"),
        encode(gradient((40, 30), "L"), "PNG"),
        encode(palette, "PNG", transparency=palette.getpixel((0, 0))),
        encode(Image.new("I;16", (12, 6), 32768), "PNG"),
        encode(gradient((16, 8), "CMYK"), "JPEG"),
        encode(gradient((40, 30)), "WEBP", lossless=True),
        encode(gradient((40, 30), "RGBA"), "WEBP"),
    ]
    before = torch.stack([backbone.preprocess(reference_rgb(d)) for d in items])
    now = decode_batch(items, LIMITS, backbone.preprocess, max_request_pixels=10**7)
    assert torch.equal(before, now)
    assert reference_rgb(items[2]).size == (40, 64)  # the turned one was turned


def test_jpeg_draft_decodes_at_the_smallest_dct_scale_that_covers_the_model() -> None:
    """Opt-in (PROMPTSERVE_JPEG_DRAFT): 640x480 for a 32-pixel model decodes at 1/8 (80x60,
    both sides still >= 32); other formats and the default path are untouched."""
    jpeg = encode(gradient((640, 480)), "JPEG")
    assert open_image(jpeg, LIMITS).size == (640, 480)
    assert open_image(jpeg, LIMITS, draft=32).size == (80, 60)
    assert open_image(jpeg, LIMITS, draft=224).size == (320, 240)  # 1/4 would be 120 < 224
    assert open_image(encode(gradient((640, 480)), "PNG"), LIMITS, draft=32).size == (640, 480)
