"""TaskRes (Yu et al., CVPR 2023): the zero-shot classifier plus a learned residual per class.

The worked example of docs/ARCHITECTURE.md ("Adding a method"): a whole method in one module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.prompts.base import PromptMethod, normalize, template_embeddings
from service.prompts.method import MethodConfig, Params
from service.prompts.recipe import Recipe


class TaskResConfig(MethodConfig):
    alpha: float = Field(default=0.5, ge=0.0, le=10.0, description="scale of the residual")


class TaskRes(PromptMethod[TaskResConfig]):
    name = "taskres"
    Config = TaskResConfig
    recipe = Recipe(lr=2e-4, epochs=50, batch_size=32, optimizer="adamw", weight_decay=0.0)
    source = "Yu et al., Task Residual for Tuning Vision-Language Models (CVPR 2023)"

    def shapes(
        self, backbone: ClipBackbone, cfg: TaskResConfig, classnames: Sequence[str]
    ) -> dict[str, tuple[int, ...]]:
        return {"residual": (len(classnames), backbone.embed_dim)}

    def init(
        self, backbone: ClipBackbone, cfg: TaskResConfig, classnames: Sequence[str], seed: int = 0
    ) -> dict[str, Tensor]:
        return {"residual": torch.zeros(len(classnames), backbone.embed_dim)}  # = zero-shot

    def class_embeddings(
        self,
        params: Params,
        backbone: ClipBackbone,
        cfg: TaskResConfig,
        classnames: Sequence[str],
        templates: Sequence[str],
    ) -> Tensor:
        with torch.no_grad():  # the zero-shot classifier stays frozen
            base = template_embeddings(backbone, classnames, templates)
        return normalize(base + cfg.alpha * params["residual"])
