"""Shared pieces of the benchmarks: a backbone with random weights and synthetic checkpoints."""

from __future__ import annotations

import base64
import io
import socket

import torch
from PIL import Image

from service.backbones.clip import ClipBackbone, load_clip
from service.checkpoints import dump, new_manifest
from service.prompts import get_method


def backbone(model: str, model_config: str | None = None) -> ClipBackbone:
    """Random weights: speed and memory do not depend on them, and nothing is downloaded."""
    torch.manual_seed(0)
    return load_clip(model, "none", model_config=model_config)


def classnames(n: int) -> list[str]:
    return [f"class number {i}" for i in range(n)]


def checkpoint_bytes(
    bb: ClipBackbone, name: str, method: str, n_classes: int, seed: int, config: dict | None = None
) -> bytes:
    """A checkpoint of `method` with the published defaults and perturbed ("trained") params."""
    m = get_method(method)
    cfg = m.config(config or {})
    names = classnames(n_classes)
    params = m.init(bb, cfg, names, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    params = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in params.items()}
    return dump(params, new_manifest(name, method, bb, names, cfg.model_dump()))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def free_port() -> int:
    """A free TCP port on loopback for a server subprocess."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def jpeg_b64(size: int) -> str:
    """One seeded random size x size JPEG, base64: the request image of the service benches."""
    gen = torch.Generator().manual_seed(0)
    pixels = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode()
