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
from typing import Any

from pydantic import Field
from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.prompts.base import (
    MethodConfig,
    Params,
    PromptMethod,
    context_size,
    normalize,
    phrase_vectors,
    template_embeddings,
)
from service.prompts.coop import context_prompts


class DualViewConfig(MethodConfig):
    n_ctx: int = Field(default=4, ge=1, le=64)
    ctx_init: str = Field(default="a photo of a", max_length=200)
    view_weight: float = Field(default=0.5, ge=0.0, le=1.0)


def soft_view(
    params: Params, backbone: ClipBackbone, cfg: Any, classnames: Sequence[str]
) -> Tensor:
    """The learnable view: normalized text features of the soft prompt."""
    return context_prompts(backbone, params["ctx"], classnames, cfg.ctx_init)


def hand_view(
    backbone: ClipBackbone, classnames: Sequence[str], templates: Sequence[str]
) -> Tensor:
    """The hand-crafted view: CLIP's template ensemble (frozen)."""
    return template_embeddings(backbone, classnames, templates)


class DualView(PromptMethod):
    name = "dualview"
    Config = DualViewConfig
    source = "Zhang, Generalizable Prompt Tuning for Vision-Language Models (arXiv 2410.03189)"

    def shapes(
        self, backbone: ClipBackbone, cfg: Any, classnames: Sequence[str]
    ) -> dict[str, tuple[int, ...]]:
        return {"ctx": (context_size(cfg), backbone.text_width)}

    def init(
        self, backbone: ClipBackbone, cfg: Any, classnames: Sequence[str], seed: int = 0
    ) -> dict[str, Tensor]:
        params = super().init(backbone, cfg, classnames, seed)
        if cfg.ctx_init:
            params["ctx"] = phrase_vectors(backbone, cfg.ctx_init, context_size(cfg))
        return params

    def class_embeddings(
        self,
        params: Params,
        backbone: ClipBackbone,
        cfg: Any,
        classnames: Sequence[str],
        templates: Sequence[str],
    ) -> Tensor:
        w = float(cfg.view_weight)
        soft = soft_view(params, backbone, cfg, classnames)
        hand = hand_view(backbone, classnames, templates)
        return normalize(w * soft + (1.0 - w) * hand)
