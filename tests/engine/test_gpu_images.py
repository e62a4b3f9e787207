"""Device decode and preprocessing (service/engine/gpu_images.py) against the exact CPU path.

The parity bar is the issue's: embedding cosine >= 0.999 and the same top-1 class on every
proving-ground test image, sent as JPEG at realistic sizes. Why it holds on any CPU: both
decoders are libjpeg-turbo with its integer IDCT (PIL's and torchvision's builds decode these
files to identical pixels), and PIL resamples in fixed-point integers, so the exact path is the
same on every machine; the torch path computes the same two 8-bit resampling passes in float32
and rounds, so SIMD-width differences can move a pixel by one level at a rounding boundary, not
more than two (|bicubic weights| sum to < 1.3). Measured: at most one level on < 0.2% of the
pixels, cosine >= 0.99999. On CUDA, nvJPEG's IDCT and chroma upsampling differ from
libjpeg-turbo by a few levels: that is what the 0.999 bar is for. Top-1 is compared on the
source domain, where zero-shot is ~95% right; on the shifted domains predictions are near-ties
and top-1 agreement would measure coin flips (as in test_int8_parity).
"""

from __future__ import annotations

import base64
import copy
import io
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from service import errors
from service.engine import gpu_images as gi
from service.engine.forward import encode
from service.images import ImageLimits, open_header, open_image
from service.training import proving_ground as pg

CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA: nvJPEG decode and the resize on the GPU (this machine has no GPU; the "
    "same code is tested on CPU tensors above)",
)
LIMITS = ImageLimits()


@pytest.fixture(scope="module")
def proving():
    """The proving-ground CLIP (pre-trained on first use, ~2 min on 2 cores; cached after)."""
    return pg.build_backbone()


def jpeg(pixels, size=None, **save) -> bytes:
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels.numpy())
    if size is not None:
        img = img.resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", **({"quality": 90} | save))
    return buf.getvalue()


def encoded(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def exact(datas, backbone) -> torch.Tensor:
    return torch.stack([backbone.preprocess(open_image(d, LIMITS)) for d in datas])


def on_device(backbone, device: str):
    if device == "cpu":
        return backbone
    return replace(
        backbone, model=copy.deepcopy(backbone.model).to(device), device=torch.device(device)
    )


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("size", [(224, 224), (640, 480)])
def test_parity_with_the_exact_path_on_the_test_images(proving, device, size):
    test = pg.make_dataset(pg.SOURCE, "test", per_class=3, seed=0)
    plan = pg.zero_shot_plan(proving, test.classnames)
    datas = [jpeg(img, size) for img in test.images]
    ref_in = exact(datas, proving)
    bb = on_device(proving, device)
    images = gi.GpuImages(bb)
    ours_in = images.decode(datas, LIMITS)
    assert ours_in.device.type == device and ours_in.shape == ref_in.shape
    assert images.refused == 0  # every image went through the device decoder
    plans = [plan] * len(datas)
    ref, ours = encode(proving, ref_in, plans), encode(bb, ours_in, plans).cpu()
    assert F.cosine_similarity(ref, ours).min() >= 0.999
    assert torch.equal(plan.logits(ref).argmax(-1), plan.logits(ours).argmax(-1))
    assert (plan.logits(ref).argmax(-1) == test.labels).float().mean() > 0.8  # a trained model
    if device == "cpu":  # the stronger CPU-only claim: at most two 8-bit levels anywhere
        levels = (ours_in - ref_in).abs() * torch.tensor(images.std).view(1, 3, 1, 1) * 255
        assert levels.max() <= 2.01


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_noisy_images_keep_their_embeddings(proving, device):
    # High-frequency content is where resampling differences show; an odd size tests the crop.
    test = pg.make_dataset("noise", "test", per_class=2, seed=1)
    datas = [jpeg(img, (333, 257)) for img in test.images]
    plans = [pg.zero_shot_plan(proving, test.classnames)] * len(datas)
    bb = on_device(proving, device)
    ref = encode(proving, exact(datas, proving), plans)
    ours = encode(bb, gi.GpuImages(bb).decode(datas, LIMITS), plans).cpu()
    assert F.cosine_similarity(ref, ours).min() >= 0.999


def test_output_size_follows_torchvision():
    assert gi.output_size(480, 640, 224) == (224, 298)  # int(224 * 640 / 480) = 298
    assert gi.output_size(640, 480, 224) == (298, 224)
    assert gi.output_size(224, 224, 224) == (224, 224)
    assert gi.output_size(10, 33, 32) == (32, 105)


# --- routing: decided from the header, before any device work --------------------------------
RGB = Image.new("RGB", (64, 48), (200, 40, 40))


def rotated_jpeg() -> bytes:
    exif = RGB.getexif()
    exif[0x0112] = 6
    return encoded(RGB, "JPEG", exif=exif.tobytes())


def truncated_jpeg() -> bytes:
    noisy = Image.effect_noise((64, 48), 80).convert("RGB")
    data = jpeg(noisy)
    return data[: len(data) * 2 // 3]


ROUTES = {
    "baseline": (jpeg(RGB), True),
    "4:4:4": (jpeg(RGB, subsampling=0), True),
    "progressive": (jpeg(RGB, progressive=True), False),
    "grey": (encoded(RGB.convert("L"), "JPEG"), False),
    "cmyk": (encoded(RGB.convert("CMYK"), "JPEG"), False),
    "exif-rotated": (rotated_jpeg(), False),
    "truncated": (truncated_jpeg(), False),
    "png": (encoded(RGB, "PNG"), False),
    "webp": (encoded(RGB, "WEBP"), False),
}


@pytest.mark.parametrize("kind", list(ROUTES))
def test_routing_from_the_header(kind):
    data, expected = ROUTES[kind]
    with open_header(data, LIMITS) as img:
        assert gi.nvjpeg_takes(img, data) is expected


def test_an_embedded_thumbnail_does_not_hide_a_truncated_image():
    # An APP segment (an EXIF thumbnail is one) holding start-of-scan and end-of-image bytes:
    # the marker walk skips it by its length, so the main image's missing EOI is still seen.
    data = jpeg(Image.effect_noise((64, 48), 80).convert("RGB"))
    payload = b"Exif\x00\x00" + b"\xff\xd8\xff\xda\x00\x02\xff\xd9" * 4
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    whole = data[:2] + app1 + data[2:]
    cut = whole[: len(whole) * 2 // 3]
    with open_header(whole, LIMITS) as img:
        assert gi.nvjpeg_takes(img, whole)
    with open_header(cut, LIMITS) as img:
        assert not gi.nvjpeg_takes(img, cut)


def test_marker_walk_refuses_garbage():
    assert gi.jpeg_frame(b"\xff\xd8\x00\x00\x00\x00") is None
    assert gi.jpeg_frame(b"\xff\xd8") is None
    frame, sos = gi.jpeg_frame(jpeg(RGB, progressive=True))
    assert frame == 0xC2 and sos > 2


# --- one batch, several routes, the exact path where the device is not used -----------------
def test_mixed_batch_falls_back_per_image(backbone, monkeypatch):
    kinds = ["baseline", "png", "progressive", "webp", "cmyk", "baseline", "exif-rotated", "grey"]
    datas = [ROUTES[k][0] for k in kinds]
    seen: list[int] = []
    real = gi.decode_jpegs

    def spy(batch, device):
        seen.append(len(batch))
        return real(batch, device)

    monkeypatch.setattr(gi, "decode_jpegs", spy)
    ours = gi.GpuImages(backbone).decode(datas, LIMITS)
    ref = exact(datas, backbone)
    assert seen == [2]  # the two baseline JPEGs, in one decoder call
    for i, kind in enumerate(kinds):
        if ROUTES[kind][1]:  # decoded and resized by the device path: within one 8-bit level
            assert (ours[i] - ref[i]).abs().max() <= 0.02
        else:
            assert torch.equal(ours[i], ref[i])  # the exact path itself


def test_base64_items_and_order_are_kept(backbone):
    datas = [ROUTES["png"][0], ROUTES["baseline"][0], ROUTES["webp"][0]]
    items = [base64.b64encode(d).decode() for d in datas]
    ours = gi.GpuImages(backbone).decode(items, LIMITS)
    assert torch.allclose(ours, exact(datas, backbone), atol=0.02)


def test_a_device_refusal_is_decoded_on_the_cpu(backbone, monkeypatch):
    def refuse(batch, device):
        raise RuntimeError("nvjpeg: unsupported")

    monkeypatch.setattr(gi, "decode_jpegs", refuse)
    images = gi.GpuImages(backbone)
    datas = [ROUTES["baseline"][0], ROUTES["png"][0]]
    assert torch.equal(images.decode(datas, LIMITS), exact(datas, backbone))
    assert images.refused == 1


def test_chunks_respect_the_pixel_budget(backbone, monkeypatch):
    monkeypatch.setattr(gi, "DECODE_PIXELS", 64 * 48 * 2)
    sizes: list[int] = []
    real = gi.decode_jpegs
    monkeypatch.setattr(gi, "decode_jpegs", lambda b, d: sizes.append(len(b)) or real(b, d))
    datas = [ROUTES["baseline"][0]] * 5
    out = gi.GpuImages(backbone).decode(datas, LIMITS)
    assert sizes == [2, 2, 1] and out.shape[0] == 5


# --- errors: the same 4xx as the CPU path, the pixel limit before the device sees anything ----
def corrupt_scan() -> bytes:
    """Intact markers (so it is routed to the device), garbage entropy-coded data."""
    data = bytearray(jpeg(Image.effect_noise((64, 48), 80).convert("RGB")))
    _, sos = gi.jpeg_frame(bytes(data))
    for i in range(sos + 20, len(data) - 2):
        data[i] = 0xFF if i % 7 == 0 else data[i] ^ 0x5A
    return bytes(data)


BAD = {
    "empty": b"",
    "gif": encoded(RGB, "GIF"),
    "bmp": encoded(RGB, "BMP"),
    "jpeg header only": jpeg(RGB)[:40],
    "truncated jpeg": truncated_jpeg(),
    "corrupt scan": corrupt_scan(),
    "not base64": "%%%not base64%%%",
    "png with a bad chunk": encoded(RGB, "PNG")[:60] + b"\x00" * 30,
}


def outcome(fn):
    try:
        fn()
    except errors.PromptServeError as err:
        return type(err), errors.http_status(err)
    return None


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_images_get_the_cpu_paths_error(backbone, kind):
    from service.api.frontend import FrontEnd
    from service.engine.protocol import ImageInput

    good = ROUTES["baseline"][0]
    items = [good, BAD[kind]]
    side = backbone.image_size[0]
    cpu = FrontEnd(None, ImageInput(backbone.preprocess, side), LIMITS, 8, 30.0)  # type: ignore[arg-type]
    expected = outcome(lambda: cpu.decode(items))
    got = outcome(lambda: gi.GpuImages(backbone).decode(items, LIMITS))
    assert got == expected
    if kind != "corrupt scan":  # libjpeg may decode garbage scan data to garbage pixels
        assert expected is not None and 400 <= expected[1] < 500


def test_pixel_limit_is_checked_before_the_device(backbone, monkeypatch):
    def never(batch, device):
        raise AssertionError("the device decoder saw an image over the pixel limit")

    monkeypatch.setattr(gi, "decode_jpegs", never)
    big = jpeg(Image.new("RGB", (400, 300)))
    with pytest.raises(errors.ImageTooLarge):
        gi.GpuImages(backbone).decode([big], ImageLimits(max_pixels=100_000))


# --- selection and wiring ----------------------------------------------------------------------
def test_selection(backbone):
    assert gi.select_image_decode("cpu", backbone)[0] is None
    images, why = gi.select_image_decode("auto", backbone)
    assert images is None and "on the CPU" in why  # auto: the device path only on CUDA
    images, why = gi.select_image_decode("gpu", backbone)
    assert isinstance(images, gi.GpuImages) and "CPU backbone" in why
    with pytest.raises(ValueError):
        gi.select_image_decode("tpu", backbone)


def test_unsupported_preprocessing_is_refused(backbone, monkeypatch):
    cfg = {"size": (32, 48), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    monkeypatch.setattr(gi, "get_model_preprocess_cfg", lambda model: cfg)
    with pytest.raises(ValueError, match="non-square"):
        gi.select_image_decode("gpu", backbone)
    assert gi.unsupported({"size": 32, "resize_mode": "squash"}) is not None
    assert gi.unsupported({"size": 224, "resize_mode": "shortest"}) is None


@CUDA
def test_nvjpeg_output_stays_on_the_gpu(backbone):
    bb = on_device(backbone, "cuda")
    images, why = gi.select_image_decode("auto", bb)
    assert images is not None and "nvJPEG" in why
    out = images.decode([ROUTES["baseline"][0], ROUTES["png"][0]], LIMITS)
    assert out.device.type == "cuda" and images.refused == 0
