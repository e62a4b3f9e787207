"""Dual-view prompts (Zhang, arXiv 2410.03189, "Generalizable Prompt Tuning for Vision-Language
Models").

Two views of each class text: a learnable soft prompt (CoOp-style context) and the hand-crafted
template(s). Training maximizes their mutual information (with class-wise augmentation on the
visual side; that lives in the training worker). At inference the two views are ensembled. The
paper leaves the ensemble open; we choose the mean of the two normalized views, renormalized
(`view_weight` = 0.5 weighs them equally), and 4 context tokens initialized from "a photo of a".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.prompts.base import (
    ClassifyObjective,
    PromptMethod,
    context_size,
    normalize,
    phrase_vectors,
    template_embeddings,
)
from service.prompts.coop import context_prompts
from service.prompts.losses import classwise_mix, view_mutual_information
from service.prompts.method import MethodConfig, Params
from service.prompts.recipe import Recipe


class DualViewConfig(MethodConfig):
    n_ctx: int = Field(default=4, ge=1, le=64)
    ctx_init: str = Field(default="a photo of a", max_length=200)
    view_weight: float = Field(default=0.5, ge=0.0, le=1.0)


def soft_view(
    params: Params, backbone: ClipBackbone, cfg: DualViewConfig, classnames: Sequence[str]
) -> Tensor:
    """The learnable view: normalized text features of the soft prompt."""
    return context_prompts(backbone, params["ctx"], classnames, cfg.ctx_init)


def hand_view(
    backbone: ClipBackbone, classnames: Sequence[str], templates: Sequence[str]
) -> Tensor:
    """The hand-crafted view: CLIP's template ensemble (frozen)."""
    return template_embeddings(backbone, classnames, templates)


class DualView(PromptMethod[DualViewConfig]):
    name = "dualview"
    Config = DualViewConfig
    # CoOp's recipe (no published config), with the two terms of this method's loss
    recipe = Recipe(lr=0.002, epochs=50, batch_size=32, mi_weight=1.0, augment_weight=1.0)
    source = "Zhang, Generalizable Prompt Tuning for Vision-Language Models (arXiv 2410.03189)"

    def shapes(
        self, backbone: ClipBackbone, cfg: DualViewConfig, classnames: Sequence[str]
    ) -> dict[str, tuple[int, ...]]:
        return {"ctx": (context_size(cfg), backbone.text_width)}

    def init(
        self, backbone: ClipBackbone, cfg: DualViewConfig, classnames: Sequence[str], seed: int = 0
    ) -> dict[str, Tensor]:
        params = super().init(backbone, cfg, classnames, seed)
        if cfg.ctx_init:
            params["ctx"] = phrase_vectors(backbone, cfg.ctx_init, context_size(cfg))
        return params

    def class_embeddings(
        self,
        params: Params,
        backbone: ClipBackbone,
        cfg: DualViewConfig,
        classnames: Sequence[str],
        templates: Sequence[str],
    ) -> Tensor:
        w = float(cfg.view_weight)
        soft = soft_view(params, backbone, cfg, classnames)
        hand = hand_view(backbone, classnames, templates)
        return normalize(w * soft + (1.0 - w) * hand)

    def objective(
        self,
        backbone: ClipBackbone,
        cfg: DualViewConfig,
        classnames: Sequence[str],
        templates: Sequence[str],
        recipe: Recipe,
        seed: int,
    ) -> ClassifyObjective[DualViewConfig]:
        """Cross-entropy, plus the views' mutual information and class-wise augmentation."""
        return DualViewObjective(self, backbone, cfg, classnames, templates, recipe, seed)


class DualViewObjective(ClassifyObjective[DualViewConfig]):
    """The ensembled views' cross-entropy + `mi_weight` x the InfoNCE bound on the two views'
    mutual information + `augment_weight` x the cross-entropy of class-wise mixed features."""

    _hand: Tensor | None = None  # the frozen hand-crafted view: computed once

    def loss(self, params: Params, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.features(params, images)
        soft = soft_view(params, self.bb, self.cfg, self.classnames)
        if self._hand is None:
            with torch.no_grad():
                self._hand = hand_view(self.bb, self.classnames, self.templates)
        w = float(self.cfg.view_weight)
        classes = F.normalize(w * soft + (1 - w) * self._hand, dim=-1)
        logits = self.scale * feats @ classes.t()
        mixed = classwise_mix(feats.detach(), labels, self.gen)
        loss = (
            F.cross_entropy(logits, labels)
            + self.recipe.mi_weight * view_mutual_information(soft, self._hand)
            + self.recipe.augment_weight * F.cross_entropy(self.scale * mixed @ classes.t(), labels)
        )
        return loss, logits
