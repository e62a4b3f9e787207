"""Converters from foreign checkpoint formats into ours (never used on uploaded bytes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.backbones.base import Backbone
from service.checkpoints import Checkpoint
from service.errors import BadRequest


def convert_file(
    src: str | Path,
    *,
    name: str,
    method: str | None,
    backbone: Backbone,
    classnames: list[str] | None,
    options: dict[str, Any],
) -> tuple[Checkpoint, bytes, str]:
    """A reference checkpoint converted and validated: (checkpoint, its bytes, a summary)."""
    from service.backbones.clip import ClipBackbone
    from service.backbones.llava import LlavaBackbone

    if isinstance(backbone, LlavaBackbone):
        from service.importers.m2pt import import_m2pt

        ckpt, data = import_m2pt(
            src, name=name, backbone=backbone, drop=options.get("drop") or (),
            conversation=options.get("conversation") or "llava_v1",
        )  # fmt: skip
        cfg, m = ckpt.manifest.method_config, ckpt.manifest
        trained = [
            p for p, on in (("projector", "train_projector"), ("head", "train_head")) if cfg[on]
        ]
        return ckpt, data, (
            f"{cfg['n_visual']} visual and {cfg['n_text']} textual prompt tokens, trained "
            f"{' and '.join(trained) or 'prompts only'}, {m.metrics['equal_to_base']} tensors "
            f"equal to the base, {len(m.dropped)} dropped"
        )  # fmt: skip
    from service.importers.dassl import import_dassl

    assert isinstance(backbone, ClipBackbone)
    if not classnames:
        raise BadRequest("--classnames FILE is required for this method")
    ckpt, data = import_dassl(
        src, name=name, classnames=classnames, backbone=backbone, method=method,
        ctx_init=options["ctx_init"], class_token_position=options["class_token_position"],
    )  # fmt: skip
    return ckpt, data, f"{len(ckpt.manifest.classnames)} classes"
