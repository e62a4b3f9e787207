"""Publishing a checkpoint: fully validated against the backbone before the store sees it."""

from __future__ import annotations

from dataclasses import dataclass

import prompts_store as ps
from service.backbones.base import Backbone
from service.checkpoints.format import MAX_CHECKPOINT_BYTES, load
from service.checkpoints.store_errors import store_errors


@dataclass(frozen=True)
class Published:
    name: str
    version: int
    method: str
    active: bool


SHOWN_DROPPED = 50  # the manifest has them all; store metadata is bounded (64 KiB)


def publish(
    store: ps.PromptStore,
    backbone: Backbone,
    data: bytes,
    *,
    activate: bool = True,
    max_bytes: int = MAX_CHECKPOINT_BYTES,
) -> Published:
    """Validate checkpoint bytes (format, manifest, shapes, fingerprint, values), then store them.

    The name comes from the manifest. Nothing reaches the store unless every check passed.
    """
    ckpt = load(data, backbone, max_bytes)
    m = ckpt.manifest
    meta = {
        "method": m.method,
        "classes": len(m.classnames),
        "backbone": m.backbone.fingerprint,
        "created_at": m.created_at,
        "metrics": m.metrics,
        # what an import left out on purpose (GET /v1/checkpoints/{name}); bounded for the store
        "dropped": m.dropped[:SHOWN_DROPPED]
        + ([{"more": len(m.dropped) - SHOWN_DROPPED}] if len(m.dropped) > SHOWN_DROPPED else []),
        "conversation": m.method_config.get("conversation"),
    }
    with store_errors():
        version = store.put(m.name, data, meta, activate=activate)
    return Published(m.name, version, m.method, activate)
