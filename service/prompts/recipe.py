"""How a method trains: optimizer, learning rate, schedule, epochs, batch (`Recipe`).

Each method owns its default recipe (`Method.recipe`), taken from its reference configs:
KaiyangZhou/CoOp (CoOp `vit_b16_ep50`, CoCoOp `vit_b16_c4_ep10_batch1_ctxv1`),
muzairkhattak/multimodal-prompt-learning (VPT `vit_b16_c2_ep5_batch4_4`, IVLP
`vit_b16_c2_ep5_batch4_2+2ctx`, MaPLe `vit_b16_c2_ep5_batch4_2ctx`) and muzairkhattak/PromptSRC
(`vit_b16_c2_ep20_batch4_4+4ctx`): SGD with momentum 0.9 and weight decay 5e-4 (Dassl's
defaults), cosine schedule, one warm-up epoch at a constant 1e-5. Bias tuning and the dual-view
method publish no configs we can read; they get the recipes of the methods they extend (IVLP-like
and CoOp-like), as docs/METHODS.md says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal


@dataclass(frozen=True)
class Recipe:
    """How one method trains."""

    lr: float
    epochs: int
    batch_size: int
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    # "cosine": Dassl's warm-up then cosine per epoch; "constant": lr throughout
    schedule: Literal["cosine", "constant"] = "cosine"
    # bf16 autocast: "auto" = on a GPU only
    mixed_precision: Literal["auto", "bf16", "off"] = "auto"
    # PromptSRC: self-regularization weights and Gaussian weighting of epoch snapshots
    text_loss_weight: float = 0.0
    image_loss_weight: float = 0.0
    gpa_mean: float = 0.0
    gpa_std: float = 0.0
    # dual-view: weight of the mutual-information term and of the class-wise augmentation
    mi_weight: float = 0.0
    augment_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("auto", "bf16", "off"):
            raise ValueError(
                f"mixed_precision must be auto, bf16 or off, not {self.mixed_precision!r}"
            )
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, not {self.schedule!r}")

    def with_overrides(self, overrides: dict[str, Any] | None) -> Recipe:
        """The recipe with user overrides (unknown keys are errors)."""
        if not overrides:
            return self
        unknown = set(overrides) - set(self.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown recipe fields: {', '.join(sorted(unknown))}")
        return replace(self, **overrides)

    def epoch_lr(self, epoch: int) -> float:
        """The learning rate of `epoch` (0-based) under this recipe's schedule."""
        if self.schedule == "constant":
            return self.lr
        if epoch < self.warmup_epochs:
            return self.warmup_lr
        t = epoch - self.warmup_epochs
        return 0.5 * self.lr * (1 + math.cos(math.pi * t / max(1, self.epochs)))

    def snapshot_weights(self) -> list[float] | None:
        """PromptSRC's Gaussian weights of the epochs' parameters (None: keep the last epoch)."""
        if self.gpa_std <= 0:
            return None
        return gaussian_weights(self.epochs, self.gpa_mean, self.gpa_std)


def gaussian_weights(epochs: int, mean: float, std: float) -> list[float]:
    """PromptSRC's Gaussian weighting of epoch snapshots (epochs 1..N), normalized to sum 1."""
    w = [
        math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
        for e in range(1, epochs + 1)
    ]
    total = sum(w)
    if total <= 0:  # a mean far outside 1..N: fall back to the last epoch
        return [0.0] * (epochs - 1) + [1.0]
    return [x / total for x in w]
