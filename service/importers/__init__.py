"""Converters from foreign checkpoint formats into ours (never used on uploaded bytes).

A method that can import its reference's checkpoints declares an importer hook (`importer`, in
its own module); the hook's type says which file format reads them: `DasslLayout`s the Dassl
`model.pth.tar-N` files (dassl.py), `M2PTOutput` M²PT's output directory (m2pt.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.backbones.base import Backbone
from service.backbones.clip import ClipBackbone
from service.backbones.llava import LlavaBackbone
from service.checkpoints import Checkpoint
from service.errors import BadRequest, InvalidContent
from service.prompts.dassl import DasslLayout
from service.prompts.m2pt import M2PTOutput
from service.prompts.method import Importer
from service.prompts.registry import METHODS, get_method

Converted = tuple[Checkpoint, bytes, str]
Reader = Callable[..., Converted]


def _dassl(
    hooks: dict[str, Importer],
    src: str | Path,
    *,
    name: str,
    method: str | None,
    backbone: Backbone,
    classnames: list[str] | None,
    options: dict[str, Any],
) -> Converted:
    from service.importers.dassl import import_dassl

    if not isinstance(backbone, ClipBackbone):
        raise InvalidContent("Dassl checkpoints import onto a CLIP backbone: pass --backbone clip")
    if not classnames:
        raise BadRequest("--classnames FILE is required for this method")
    ckpt, data = import_dassl(
        src, name=name, classnames=classnames, backbone=backbone, method=method,
        ctx_init=options.get("ctx_init"),
        class_token_position=options.get("class_token_position"),
    )  # fmt: skip
    return ckpt, data, f"{len(ckpt.manifest.classnames)} classes"


def _m2pt(
    hooks: dict[str, Importer],
    src: str | Path,
    *,
    name: str,
    method: str | None,
    backbone: Backbone,
    classnames: list[str] | None,
    options: dict[str, Any],
) -> Converted:
    from service.importers.m2pt import import_m2pt

    if not isinstance(backbone, LlavaBackbone):
        raise InvalidContent("M²PT checkpoints import onto a LLaVA backbone: pass --backbone llava")
    layouts = {n: h for n, h in hooks.items() if isinstance(h, M2PTOutput)}
    (method, layout), *_ = layouts.items()  # the method whose hook reads M²PT's output
    ckpt, data = import_m2pt(
        src, name=name, backbone=backbone, drop=options.get("drop") or (),
        conversation=options.get("conversation") or "llava_v1", layout=layout, method=method,
    )  # fmt: skip
    cfg, m = ckpt.manifest.method_config, ckpt.manifest
    trained = [p for p, on in (("projector", "train_projector"), ("head", "train_head")) if cfg[on]]
    return ckpt, data, (
        f"{cfg['n_visual']} visual and {cfg['n_text']} textual prompt tokens, trained "
        f"{' and '.join(trained) or 'prompts only'}, {m.metrics['equal_to_base']} tensors "
        f"equal to the base, {len(m.dropped)} dropped"
    )  # fmt: skip


# The file format each kind of importer hook reads.
READERS: tuple[tuple[type, Reader], ...] = ((DasslLayout, _dassl), (M2PTOutput, _m2pt))


def convert_file(
    src: str | Path,
    *,
    name: str,
    method: str | None,
    backbone: Backbone,
    classnames: list[str] | None,
    options: dict[str, Any],
) -> Converted:
    """A reference checkpoint converted and validated: (checkpoint, its bytes, a summary).

    With `method`, that method's importer; without, the importers of the methods that run on
    the served backbone (the Dassl reader then decides the method from the file's keys)."""
    if method is not None:
        hooks = {method: get_method(method).importer}
    else:
        hooks = {n: m.importer for n, m in METHODS.items() if m.backbone_kind == backbone.kind}
    for kind, read in READERS:
        if found := {n: h for n, h in hooks.items() if isinstance(h, kind)}:
            return read(
                found, src, name=name, method=method, backbone=backbone, classnames=classnames,
                options=options,
            )  # fmt: skip
    raise BadRequest(
        f"no importer for {f'method {method!r}' if method else f'a {backbone.kind} backbone'}"
    )
