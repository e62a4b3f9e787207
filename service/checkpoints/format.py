"""The checkpoint format: one `.safetensors` file per version, a JSON manifest in its metadata.

Tensors are the method's trainable parameters as trained (not materialized): float32, or
bfloat16 where the method's config says so (a reference trained them in bf16: widening would
double a 7B output head's 262 MB for nothing). Loading
validates everything before anything is used, and every failure is a typed error whose message
says what to change. Uploaded bytes are never unpickled: safetensors only.
"""

from __future__ import annotations

import re
import struct
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from service import jsonsafe
from service.backbones.base import Backbone
from service.backbones.registry import kind as backbone_kind
from service.errors import (
    BackboneMismatch,
    BadRequest,
    CheckpointTooLarge,
    DtypeMismatch,
    ExtraTensor,
    InvalidClassnames,
    InvalidConfig,
    MalformedCheckpoint,
    MissingTensor,
    NonFiniteTensor,
    ShapeMismatch,
)
from service.prompts.plans import ServingPlan
from service.prompts.registry import METHODS, AnyMethod, get_method

FORMAT = 1
METADATA_KEY = "promptserve"
# room for one 7B output head in bf16 (32000 x 4096 x 2 = 250 MiB) with its prompts and projector
MAX_CHECKPOINT_BYTES = 320 * 2**20
MAX_HEADER_BYTES = 8 * 2**20
MAX_CLASSES = 10_000
MAX_CLASSNAME_CHARS = 200
MAX_TEMPLATES = 100
MAX_TEMPLATE_CHARS = 300
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PARAM_DTYPE = torch.float32
STORED_DTYPES = (torch.float32, torch.bfloat16)


class BackboneRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=200)
    pretrained: str = Field(max_length=1000)
    fingerprint: str = Field(max_length=100)


class Manifest(BaseModel):
    """The JSON manifest stored in a checkpoint's safetensors metadata."""

    model_config = ConfigDict(extra="forbid")
    format: int = FORMAT
    name: str = Field(pattern=NAME_PATTERN.pattern)
    method: str = Field(max_length=64)
    method_config: dict[str, Any] = Field(default_factory=dict)
    backbone: BackboneRef
    classnames: list[str]
    templates: list[str] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    dataset: dict[str, Any] | None = None
    # trained tensors of the source left out on purpose (`promptserve import --drop`): what is lost
    dropped: list[dict[str, Any]] = Field(default_factory=list, max_length=10_000)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    parent: int | None = None


class Checkpoint(BaseModel):
    """A parsed checkpoint: manifest plus parameters (validated against a backbone by `load`)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
    manifest: Manifest
    params: dict[str, Tensor]

    def to_bytes(self) -> bytes:
        """The `.safetensors` file of this checkpoint (what `POST /v1/checkpoints` takes)."""
        return dump(self.params, self.manifest)


def normalize_classname(name: str) -> str:
    """NFC, whitespace collapsed: the form class names are compared and stored in."""
    return " ".join(unicodedata.normalize("NFC", name).split())


def check_classnames(classnames: Sequence[Any]) -> list[str]:
    """Non-empty, printable, bounded, unique after normalization; returns the normalized names."""
    if not isinstance(classnames, list | tuple) or not classnames:
        raise InvalidClassnames("classnames must be a non-empty list of strings")
    if len(classnames) > MAX_CLASSES:
        raise InvalidClassnames(f"{len(classnames)} class names; at most {MAX_CLASSES} allowed")
    seen: dict[str, int] = {}
    out = []
    for i, raw in enumerate(classnames):
        if not isinstance(raw, str):
            raise InvalidClassnames(f"class name #{i} is not a string")
        name = normalize_classname(raw)
        if not name:
            raise InvalidClassnames(f"class name #{i} is empty")
        if len(name) > MAX_CLASSNAME_CHARS:
            raise InvalidClassnames(
                f"class name #{i} has {len(name)} characters; at most {MAX_CLASSNAME_CHARS}"
            )
        if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co") for ch in name):
            raise InvalidClassnames(f"class name #{i} contains control or format characters")
        key = name.casefold()
        if key in seen:
            raise InvalidClassnames(
                f"class names #{seen[key]} and #{i} are the same after normalization ({name!r})"
            )
        seen[key] = i
        out.append(name)
    return out


def check_templates(templates: Sequence[Any]) -> list[str]:
    """Each template has exactly one `{}` and no other braces; bounded count and length."""
    if len(templates) > MAX_TEMPLATES:
        raise InvalidClassnames(f"{len(templates)} templates; at most {MAX_TEMPLATES} allowed")
    for i, t in enumerate(templates):
        if not isinstance(t, str) or len(t) > MAX_TEMPLATE_CHARS:
            raise InvalidClassnames(f"template #{i} must be a string of <= {MAX_TEMPLATE_CHARS}")
        if t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}"):
            raise InvalidClassnames(f"template #{i} must contain exactly one '{{}}' and no braces")
    return list(templates)


def dump(params: Mapping[str, Tensor], manifest: Manifest) -> bytes:
    """Serialize a checkpoint (contiguous CPU tensors, bfloat16 kept, anything else float32, +
    manifest) to safetensors bytes."""
    tensors = {
        k: v.detach().to("cpu", v.dtype if v.dtype in STORED_DTYPES else PARAM_DTYPE).contiguous()
        for k, v in params.items()
    }
    return st_save(tensors, metadata={METADATA_KEY: manifest.model_dump_json()})


def _header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise MalformedCheckpoint("not a safetensors file: shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES or 8 + size > len(data):
        raise MalformedCheckpoint(
            "not a safetensors file: its header length does not fit the file "
            "(upload the .safetensors checkpoint; .pth files go through `promptserve import`)"
        )
    try:
        header = jsonsafe.loads(data[8 : 8 + size], "safetensors header", max_depth=4)
    except BadRequest as exc:  # the file's fault: a 422 like every malformed checkpoint
        raise MalformedCheckpoint(exc.message) from None
    if not isinstance(header, dict):
        raise MalformedCheckpoint("safetensors header is not a JSON object")
    return header


def parse(data: bytes, max_bytes: int = MAX_CHECKPOINT_BYTES) -> Checkpoint:
    """Structure-level reading: size, safetensors layout, manifest schema, finite float values."""
    if len(data) > max_bytes:
        raise CheckpointTooLarge(f"checkpoint is {len(data)} bytes; the limit is {max_bytes}")
    header = _header(data)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not isinstance(meta.get(METADATA_KEY), str):
        raise MalformedCheckpoint(
            "safetensors file has no promptserve manifest; convert foreign checkpoints with "
            "`promptserve import`"
        )
    try:
        manifest = Manifest.model_validate_json(meta[METADATA_KEY])
    except ValidationError as exc:
        raise MalformedCheckpoint(f"invalid checkpoint manifest: {exc}") from exc
    if manifest.format != FORMAT:
        raise MalformedCheckpoint(
            f"checkpoint format {manifest.format}; this server reads {FORMAT}"
        )
    try:
        params = st_load(data)
    except Exception as exc:  # safetensors raises its own error types for lying offsets etc.
        raise MalformedCheckpoint(f"corrupt safetensors payload: {exc}") from exc
    for key, tensor in params.items():
        if tensor.dtype not in STORED_DTYPES:
            raise DtypeMismatch(
                f"tensor {key!r} is {tensor.dtype}; checkpoints store float32 (or bfloat16)"
            )
        if not torch.isfinite(tensor).all():
            raise NonFiniteTensor(f"tensor {key!r} contains NaN or Inf values")
    if manifest.classnames or _names_classes(manifest.method):
        manifest.classnames = check_classnames(manifest.classnames)
    check_templates(manifest.templates)
    return Checkpoint(manifest=manifest, params=params)


def _names_classes(method: str) -> bool:
    """Classification checkpoints name their classes; those that answer instructions do not
    (an unknown method is refused later, by `validate`, with the known ones listed)."""
    known = METHODS.get(method)
    return known is None or known.task == "classify"


def check_backbone(method: AnyMethod, backbone: Backbone) -> None:
    """Refuse a method of another backbone kind before its shapes are asked of this one."""
    if method.backbone_kind != backbone.kind:
        needed = backbone_kind(method.backbone_kind).cls
        raise InvalidConfig(
            f"{method.name} checkpoints need a {needed.title} backbone (--backbone "
            f"{needed.kind}); this server runs a {backbone.title} backbone "
            f"({backbone.model_name})"
        )


def validate(ckpt: Checkpoint, backbone: Backbone) -> Any:
    """Check a parsed checkpoint against the loaded backbone; returns the method's config."""
    m = ckpt.manifest
    method = get_method(m.method)
    cfg = method.config(m.method_config)
    check_backbone(method, backbone)
    if m.backbone.fingerprint != backbone.fingerprint:
        raise BackboneMismatch(
            f"checkpoint {m.name!r} was trained on backbone {m.backbone.model} "
            f"({m.backbone.fingerprint[:19]}...), but this server runs {backbone.model_name} "
            f"({backbone.fingerprint[:19]}...); retrain or serve it on that backbone"
        )
    expected = method.shapes(backbone, cfg, m.classnames)
    missing = sorted(set(expected) - set(ckpt.params))
    if missing:
        raise MissingTensor(f"{m.method} checkpoint lacks tensor(s) {', '.join(missing)}")
    extra = sorted(set(ckpt.params) - set(expected))
    if extra:
        raise ExtraTensor(f"{m.method} checkpoint has unexpected tensor(s) {', '.join(extra)}")
    dtype = method.param_dtype(cfg)
    for key, shape in expected.items():
        if ckpt.params[key].dtype != dtype:
            raise DtypeMismatch(
                f"tensor {key!r} is {ckpt.params[key].dtype}; this {m.method} config stores {dtype}"
            )
        got = tuple(ckpt.params[key].shape)
        if got != tuple(shape):
            raise ShapeMismatch(
                f"tensor {key!r} has shape {list(got)}; {m.method} on this backbone needs "
                f"{list(shape)}"
            )
    return cfg


def load(data: bytes, backbone: Backbone, max_bytes: int = MAX_CHECKPOINT_BYTES) -> Checkpoint:
    """Parse and fully validate checkpoint bytes for this backbone."""
    ckpt = parse(data, max_bytes)
    validate(ckpt, backbone)
    return ckpt


def materialize(ckpt: Checkpoint, backbone: Backbone) -> ServingPlan:
    """The checkpoint's serving form (class embeddings computed once, here)."""
    m = ckpt.manifest
    method = get_method(m.method)
    cfg = validate(ckpt, backbone)
    return method.materialize(ckpt.params, backbone, cfg, m.classnames, m.templates)


def new_manifest(
    name: str,
    method: str,
    backbone: Backbone,
    classnames: Sequence[str],
    method_config: Mapping[str, Any] | None = None,
    templates: Sequence[str] = (),
    **extra: Any,
) -> Manifest:
    """A manifest for a checkpoint trained (or imported) on this backbone."""
    return Manifest(
        name=name,
        method=method,
        method_config=dict(method_config or {}),
        backbone=BackboneRef(
            model=backbone.model_name,
            pretrained=backbone.pretrained,
            fingerprint=backbone.fingerprint,
        ),
        classnames=(
            check_classnames(list(classnames)) if classnames or _names_classes(method) else []
        ),
        templates=check_templates(list(templates)),
        **extra,
    )
