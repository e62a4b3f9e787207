"""The runtime contract: run a batch of images under per-sample prompt tensors."""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.backbones.prompted import Placement


class Runtime(Protocol):
    """Image features (unnormalized) of the prompted vision tower, like `encode_image`."""

    name: str

    def encode(
        self,
        images: Tensor,
        tokens: Tensor | None,
        bias: Tensor | None,
        placement: Placement,
    ) -> Tensor: ...

    def describe(self) -> dict[str, Any]:
        """What /readyz shows about this runtime."""
        ...


class TorchRuntime:
    """Eager PyTorch: the reference every other runtime is compared with."""

    name = "torch"

    def __init__(self, backbone: ClipBackbone) -> None:
        self.backbone = backbone

    def encode(
        self, images: Tensor, tokens: Tensor | None, bias: Tensor | None, placement: Placement
    ) -> Tensor:
        return self.backbone.encode_image(images, tokens, bias, placement)

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name, "device": str(self.backbone.device)}
