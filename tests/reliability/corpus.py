"""The bad-input corpus, generated in-test (nothing downloaded): images, request bodies and
checkpoints that a careless or hostile client could send, each with the status and error code
the one table must give it. `write_corpus(dir)` dumps the byte-level items as files for other
tools (e.g. a fuzzer's seed directory)."""

from __future__ import annotations

import base64
import io
import json
import pickle
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save as st_save

from service.checkpoints import dump, new_manifest
from service.prompts import get_method

CLASSNAMES = ["cat", "dog", "red_car", "sea turtle"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _save(fmt: str, size: tuple[int, int] = (32, 32), mode: str = "RGB", **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + data))
    return struct.pack(">I", len(data)) + kind + data + crc


def png_bomb(w: int = 100_000, h: int = 100_000) -> bytes:
    """A valid PNG header claiming w x h pixels, with almost no data behind it."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 8))
        + _png_chunk(b"IEND", b"")
    )


def jpeg_bomb(w: int = 60_000, h: int = 60_000) -> bytes:
    """A real small JPEG whose SOF0 frame header is rewritten to claim w x h pixels."""
    data = bytearray(_save("JPEG", (16, 16)))
    sof = data.index(b"\xff\xc0")  # baseline frame: marker, length(2), precision(1), h(2), w(2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def corrupt_png() -> bytes:
    data = bytearray(_save("PNG", (64, 64)))
    data[60:90] = b"\xaa" * 30  # inside IDAT: the CRC and the deflate stream are wrong
    return bytes(data)


# name -> (image bytes or base64 text, status, code)
IMAGES: dict[str, tuple[bytes, int, str]] = {
    "png-bomb-100k-x-100k": (png_bomb(), 413, "image_too_large"),
    "jpeg-bomb-60k-x-60k": (jpeg_bomb(), 413, "image_too_large"),
    "png-truncated": (_save("PNG", (64, 64))[:80], 422, "invalid_image"),
    "jpeg-truncated": (_save("JPEG", (64, 64))[:200], 422, "invalid_image"),
    "webp-truncated": (_save("WEBP", (64, 64))[:40], 422, "invalid_image"),
    "png-corrupt-data": (corrupt_png(), 422, "invalid_image"),
    "png-magic-only": (b"\x89PNG\r\n\x1a\n", 422, "invalid_image"),
    "random-bytes": (bytes(range(256)) * 4, 415, "unsupported_image_format"),
    "gif": (_save("GIF", (8, 8)), 415, "unsupported_image_format"),
    "bmp": (_save("BMP", (8, 8)), 415, "unsupported_image_format"),
    "tiff": (_save("TIFF", (8, 8)), 415, "unsupported_image_format"),
    "ico": (_save("ICO", (16, 16)), 415, "unsupported_image_format"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', 415,
            "unsupported_image_format"),
    "pdf": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 415, "unsupported_image_format"),
}  # fmt: skip

# base64 text that is not base64: name -> (text, status, code)
BASE64: dict[str, tuple[str, int, str]] = {
    "empty-string": ("", 400, "invalid_base64"),
    "percent-signs": ("%%%not base64%%%", 400, "invalid_base64"),
    "cut-padding": (b64(_save("PNG"))[:-3], 400, "invalid_base64"),
    "nul-inside": ("iVBO\x00Rw0K", 400, "invalid_base64"),
    "unicode": ("ｉＶＢＯＲｗ０Ｋ", 400, "invalid_base64"),
    "data-uri-wrong-type": (
        "data:text/html;base64," + b64(b"<p>"), 415, "unsupported_image_format"
    ),
}  # fmt: skip

# ad-hoc zero-shot class names: name -> classnames
CLASSNAMES_BAD: dict[str, list[str]] = {
    "empty-list": [],
    "empty-name": ["cat", ""],
    "blank-name": ["cat", "   "],
    "duplicate": ["cat", "cat"],
    "duplicate-after-normalizing": ["cat", " CAT "],
    "10000-chars": ["x" * 10_000],
    "nul": ["ca\x00t"],
    "newline-escape": ["cat\x1b[31m"],
    "right-to-left-override": ["a\u202eb"],
    "zero-width-joiner": ["ca\u200dt"],
    "bidi-isolate": ["\u2067dog\u2069"],
}


# --- checkpoints ---------------------------------------------------------------------------------


def _params(backbone: Any, method: str = "coop") -> tuple[dict[str, torch.Tensor], Any]:
    m = get_method(method)
    cfg = m.config({"n_ctx": 4} if method == "coop" else {})
    params = m.init(backbone, cfg, CLASSNAMES, seed=0)
    return params, new_manifest("corpus", method, backbone, CLASSNAMES, cfg.model_dump())


def _with_manifest(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """Rewrite the manifest inside a safetensors file, bypassing our own validation."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    meta = header["__metadata__"]
    key = next(iter(meta))
    manifest = json.loads(meta[key])
    edit(manifest)
    meta[key] = json.dumps(manifest)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + size :]


def _lying_offsets(data: bytes) -> bytes:
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 10**6
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + size :]


def _named(name: str) -> Callable[[dict[str, Any]], None]:
    def edit(m: dict[str, Any]) -> None:
        m["name"] = name

    return edit


def checkpoints(backbone: Any, other_backbone: Any) -> dict[str, tuple[bytes, int, str]]:
    """name -> (upload bytes, status, code): every way a checkpoint upload can be wrong."""
    params, manifest = _params(backbone)
    good = dump(params, manifest)
    key = next(iter(params))

    def tensors(**changes: Any) -> bytes:
        out = dict(params)
        for k, v in changes.items():
            if v is None:
                out.pop(k.replace("__", "."), None)
            else:
                out[k.replace("__", ".")] = v
        return dump(out, manifest)

    nan, inf = params[key].clone(), params[key].clone()
    nan.view(-1)[0], inf.view(-1)[-1] = float("nan"), float("inf")
    half = {k: v.contiguous().half() for k, v in params.items()}
    foreign_params, foreign_manifest = _params(other_backbone)
    rows: dict[str, tuple[bytes, int, str]] = {
        "nan": (tensors(**{key: nan}), 422, "non_finite_tensor"),
        "inf": (tensors(**{key: inf}), 422, "non_finite_tensor"),
        "wrong-shape": (tensors(**{key: torch.zeros(3, 7)}), 422, "shape_mismatch"),
        "missing-tensor": (tensors(**{key: None}), 422, "missing_tensor"),
        "extra-tensor": (tensors(surprise=torch.zeros(2)), 422, "extra_tensor"),
        "wrong-dtype": (
            st_save(half, metadata={"promptserve": manifest.model_dump_json()}),
            422,
            "dtype_mismatch",
        ),
        "foreign-backbone": (dump(foreign_params, foreign_manifest), 422, "backbone_mismatch"),
        "pickle-renamed": (pickle.dumps({key: [1.0, 2.0]}), 422, "malformed_checkpoint"),
        "header-lies-about-offsets": (_lying_offsets(good), 422, "malformed_checkpoint"),
        "header-length-2^60": (struct.pack("<Q", 2**60) + good[8:], 422, "malformed_checkpoint"),
        "no-manifest": (st_save({key: params[key].contiguous()}), 422, "malformed_checkpoint"),
        "empty-file": (b"", 422, "malformed_checkpoint"),
        "unknown-method": (
            _with_manifest(good, lambda m: m.update(method="telepathy")), 422, "unknown_method",
        ),
        "empty-classnames": (
            _with_manifest(good, lambda m: m.update(classnames=[])), 422, "invalid_classnames",
        ),
        "rtl-classname": (
            _with_manifest(good, lambda m: m.update(classnames=["cat", "dog\u202e"])),
            422, "invalid_classnames",
        ),
    }  # fmt: skip
    for label, name in (
        ("name-dotdot", "../../etc/passwd"),
        ("name-slash", "a/b"),
        ("name-backslash", "a\\b"),
        ("name-nul", "a\x00b"),
        ("name-1000-chars", "a" * 1000),
        ("name-empty", ""),
        ("name-dot", "."),
        ("name-control", "ab\x1b"),
    ):
        rows[label] = (_with_manifest(good, _named(name)), 422, "malformed_checkpoint")
    return rows


def write_corpus(folder: Path, backbone: Any, other_backbone: Any) -> int:
    """Write every byte-level item as a file; returns how many."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, (data, _, _) in IMAGES.items():
        (folder / f"image-{name}.bin").write_bytes(data)
        n += 1
    for name, (data, _, _) in checkpoints(backbone, other_backbone).items():
        (folder / f"checkpoint-{name}.safetensors").write_bytes(data)
        n += 1
    return n
