"""The plans methods materialize into: what a checkpoint version is at serving time.

`ServingPlan` is what residency and the engines need of any plan (its size, a copy on another
device, and the signature that says which plans share one batch). `Plan` is the classification
plan every CLIP method materializes into: vision-side deep tokens and biases, a class matrix or
an image-conditional head, and labels; the engine consumes it with one prompted forward and one
matrix product, never knowing which method made it. (M²PT's `AnswerPlan` is in m2pt.py.)
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol, Self

import torch
from torch import Tensor

from service.backbones.prompted import Placement


class ServingPlan(Protocol):
    """What residency and the engines need of every method's plan."""

    labels: tuple[str, ...]

    @property
    def signature(self) -> Hashable:
        """Plans with equal signatures share one batch (their prompts are stacked per row)."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes held by the plan's tensors (what residency budgets count)."""
        ...

    def to(self, device: torch.device | str) -> Self:
        """The same plan with its tensors on `device` (residency moves plans between tiers)."""
        ...


@dataclass(frozen=True)
class Signature:
    """Placement and shapes of a plan's vision-side tokens: equal signatures share a pass.

    Biases are not part of it: a plan without biases joins a biased batch with zero biases, which
    is a no-op. Tokens are: zero tokens are still attended to.
    """

    depth: int = 0
    n_tokens: int = 0
    placement: str = "append"


PLAIN = Signature()


class ClassHead(Protocol):
    """An image-conditional classifier (CoCoOp): class embeddings per image."""

    nbytes: int  # bytes of its tensors, counted by residency budgets

    def __call__(self, image_features: Tensor) -> Tensor:
        """Normalized image features `[B, e]` -> normalized class embeddings `[B, C, e]`."""
        ...

    def to(self, device: torch.device | str) -> ClassHead:
        """The same head with its tensors on `device`."""
        ...


@dataclass(eq=False)
class Plan:
    """What a checkpoint version is at serving time; immutable once built."""

    labels: tuple[str, ...]
    logit_scale: float
    classes: Tensor | None = None  # [C, e], L2-normalized
    head: ClassHead | None = None  # image-conditional alternative to `classes`
    vision_tokens: Tensor | None = None  # [L, n, d_vision]
    vision_bias: Tensor | None = None  # [L, d_vision]
    placement: Placement = "append"

    def __post_init__(self) -> None:
        if (self.classes is None) == (self.head is None):
            raise ValueError("a Plan has exactly one of `classes` and `head`")

    @property
    def signature(self) -> Signature:
        if self.vision_tokens is None:
            return PLAIN
        depth, n, _ = self.vision_tokens.shape
        return Signature(depth, n, self.placement)

    @property
    def vision_key(self) -> Hashable:
        """Plans with equal keys produce identical image features: every plan without vision
        tokens and biases sees the plain features; a prompted plan only its own."""
        if self.vision_tokens is None and self.vision_bias is None:
            return PLAIN
        return id(self)

    def logits(self, image_features: Tensor) -> Tensor:
        """Logits `[B, C]` from normalized image features `[B, e]`: one matrix product."""
        feats = image_features.to(torch.float32)
        if self.classes is not None:
            return self.logit_scale * feats @ self.classes.to(feats.device).t()
        assert self.head is not None
        per_image = self.head(feats)
        return self.logit_scale * torch.einsum("be,bce->bc", feats, per_image)

    def to(self, device: torch.device | str) -> Plan:
        """The same plan with its tensors on `device` (residency moves plans between tiers)."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return Plan(
            labels=self.labels,
            logit_scale=self.logit_scale,
            classes=move(self.classes),
            head=None if self.head is None else self.head.to(device),
            vision_tokens=move(self.vision_tokens),
            vision_bias=move(self.vision_bias),
            placement=self.placement,
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the plan's tensors (what residency budgets count)."""
        tensors = [self.classes, self.vision_tokens, self.vision_bias]
        extra = 0 if self.head is None else self.head.nbytes
        return extra + sum(t.numel() * t.element_size() for t in tensors if t is not None)
