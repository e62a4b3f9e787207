"""Bias tuning (Ma et al., arXiv 2312.11570, "Understanding the Multi-modal Prompts of the
Pre-trained Vision-Language Model").

The paper's finding: learned prompts act mainly as a dataset bias on the token embeddings. Bias
tuning makes that explicit: a learnable vector per layer, added to every token at the input of
that transformer layer, in the vision and/or text tower. Zero-initialized, so an untrained
checkpoint is exactly the plain backbone. The text side uses the hand-crafted template(s).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.prompts.base import PromptMethod, template_embeddings
from service.prompts.method import MethodConfig, Params
from service.prompts.recipe import Recipe


class BiasConfig(MethodConfig):
    towers: Literal["vision", "text", "both"] = "both"
    depth_vision: int = Field(default=12, ge=1, le=64)
    depth_text: int = Field(default=12, ge=1, le=64)


class BiasTuning(PromptMethod[BiasConfig]):
    name = "bias"
    Config = BiasConfig
    recipe = Recipe(lr=0.0035, epochs=5, batch_size=4)  # IVLP's: no published config
    source = "Ma et al., Understanding the Multi-modal Prompts of the Pre-trained VLM (2312.11570)"
    # the proving ground's domain shift is in the images
    proving_config: ClassVar[Mapping[str, Any]] = {"towers": "vision"}

    def shapes(
        self, backbone: ClipBackbone, cfg: BiasConfig, classnames: Sequence[str]
    ) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        if cfg.towers in ("vision", "both"):
            depth = min(int(cfg.depth_vision), backbone.vision_layers)
            shapes["vision_bias"] = (depth, backbone.vision_width)
        if cfg.towers in ("text", "both"):
            depth = min(int(cfg.depth_text), backbone.text_layers)
            shapes["text_bias"] = (depth, backbone.text_width)
        return shapes

    def init(
        self, backbone: ClipBackbone, cfg: BiasConfig, classnames: Sequence[str], seed: int = 0
    ) -> dict[str, Tensor]:
        return {k: torch.zeros(s) for k, s in self.shapes(backbone, cfg, classnames).items()}

    def vision_prompts(
        self, params: Params, backbone: ClipBackbone, cfg: BiasConfig
    ) -> tuple[Tensor | None, Tensor | None]:
        return None, params.get("vision_bias")

    def class_embeddings(
        self,
        params: Params,
        backbone: ClipBackbone,
        cfg: BiasConfig,
        classnames: Sequence[str],
        templates: Sequence[str],
    ) -> Tensor:
        return template_embeddings(backbone, classnames, templates, bias=params.get("text_bias"))
