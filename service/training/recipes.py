"""The short recipe the proving ground's small CLIP trains with, in the tests, the demo and the
METHODS table: the methods' published recipes (each method's `recipe`) are tuned for ViT-B/16 on
real data and barely move the small backbone."""

from __future__ import annotations

from typing import Any

from service.prompts.registry import METHODS

PROVING_RECIPE: dict[str, Any] = {
    "optimizer": "adamw",
    "lr": 0.03,
    "epochs": 40,
    "batch_size": 32,
    "warmup_epochs": 0,
    "weight_decay": 0.0,
}
# Configs for the small backbone, by method (each method's `proving_config`; the defaults
# elsewhere): a proving-ground setting.
PROVING_CONFIG: dict[str, dict[str, Any]] = {
    name: dict(m.proving_config) for name, m in METHODS.items() if m.proving_config
}
