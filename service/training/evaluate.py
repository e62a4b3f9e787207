"""Accuracy of a materialized checkpoint on labeled images: overall, per class, base/novel/HM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.engine.forward import classify
from service.prompts.plans import Plan


@torch.no_grad()
def predict(backbone: ClipBackbone, plan: Plan, images: Tensor, batch: int = 256) -> Tensor:
    """Top-1 class per image through the serving path (batched encoder, one product)."""
    out = []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        logits = classify(backbone, chunk, [plan] * len(chunk))
        out.append(torch.stack(logits).argmax(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(
    backbone: ClipBackbone, plan: Plan, images: Tensor, labels: Tensor, classnames: Sequence[str]
) -> dict[str, Any]:
    """Accuracy and per-class accuracy (labels index `classnames`)."""
    pred = predict(backbone, plan, images)
    labels = labels.cpu()
    hits = pred == labels
    per_class = {
        name: float(hits[labels == c].float().mean()) if bool((labels == c).any()) else None
        for c, name in enumerate(classnames)
    }
    return {
        "accuracy": float(hits.float().mean()) if len(hits) else 0.0,
        "per_class": per_class,
        "n": len(labels),
    }


def harmonic_mean(base: float, novel: float) -> float:
    """The base-to-novel protocol's summary: 2 B N / (B + N)."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)
