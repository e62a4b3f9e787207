"""Deep prompts: VPT-deep (vision only) and IVLP / PromptSRC (independent vision and language).

Layout as in muzairkhattak/multimodal-prompt-learning and muzairkhattak/PromptSRC:
- vision: `vision_ctx [depth, n, d_v]`, layer 0 appended after the patch tokens before `ln_pre`,
  layers 1..depth-1 replace the last n tokens;
- IVLP / PromptSRC with depth_vision 0 (language-only prompting) have no `vision_ctx`;
- text (IVLP, PromptSRC): `text_ctx [depth, n, d_t]`; layer 0 is the prompt learner's context
  (initialized from "a photo of a"), written at positions [1, 1+n) of "{init phrase} {class}.";
  layers 1..depth-1 replace those positions.
VPT-deep keeps the text side hand-crafted ("a photo of a {}.").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field, model_validator
from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.prompts.base import (
    MethodConfig,
    Params,
    PromptMethod,
    ctx_prefix,
    normalize,
    phrase_vectors,
    prompt_text,
    template_embeddings,
)


class VPTConfig(MethodConfig):
    n_ctx_vision: int = Field(default=8, ge=1, le=64)
    depth_vision: int = Field(default=12, ge=1, le=64)


class VPTDeep(PromptMethod):
    name = "vpt"
    Config = VPTConfig
    source = "Jia et al., Visual Prompt Tuning (ECCV 2022); layout of multimodal-prompt-learning"

    def _depth(self, backbone: ClipBackbone, cfg: Any) -> int:
        # The published default (12) means "every layer" of ViT-B; smaller backbones clamp.
        return min(int(cfg.depth_vision), backbone.vision_layers)

    def shapes(
        self, backbone: ClipBackbone, cfg: Any, classnames: Sequence[str]
    ) -> dict[str, tuple[int, ...]]:
        return {"vision_ctx": (self._depth(backbone, cfg), cfg.n_ctx_vision, backbone.vision_width)}

    def vision_prompts(
        self, params: Params, backbone: ClipBackbone, cfg: Any
    ) -> tuple[Tensor | None, Tensor | None]:
        return params["vision_ctx"], None

    def class_embeddings(
        self,
        params: Params,
        backbone: ClipBackbone,
        cfg: Any,
        classnames: Sequence[str],
        templates: Sequence[str],
    ) -> Tensor:
        return template_embeddings(backbone, classnames, templates)


class IVLPConfig(MethodConfig):
    # depth_vision 0 is language-only prompting (the reference's `_4ctx_language_only` config,
    # N_CTX_VISION 0 and PROMPT_DEPTH_VISION 0): no vision tensor, plain image encoder
    n_ctx_vision: int = Field(default=2, ge=0, le=64)
    n_ctx_text: int = Field(default=2, ge=1, le=64)
    depth_vision: int = Field(default=12, ge=0, le=64)
    depth_text: int = Field(default=12, ge=1, le=64)
    ctx_init: str = Field(default="a photo of a", max_length=200)

    @model_validator(mode="after")
    def _vision_tokens(self) -> IVLPConfig:
        # As in the reference, depth_vision 0 ignores n_ctx_vision; prompted layers need tokens.
        if self.depth_vision > 0 and self.n_ctx_vision == 0:
            raise ValueError(
                "n_ctx_vision is 0 but depth_vision is not: for language-only prompting set "
                "depth_vision 0 (and n_ctx_vision 0)"
            )
        return self


class IVLP(PromptMethod):
    name = "ivlp"
    Config = IVLPConfig
    source = "Khattak et al., MaPLe (CVPR 2023) baseline IVLP; multimodal-prompt-learning"

    def _depths(self, backbone: ClipBackbone, cfg: Any) -> tuple[int, int]:
        # depth_vision 0 never asks for the image tower's layers: language-only runs on any tower
        dv = int(cfg.depth_vision)
        return (
            min(dv, backbone.vision_layers) if dv else 0,
            min(int(cfg.depth_text), backbone.text_layers),
        )

    def shapes(
        self, backbone: ClipBackbone, cfg: Any, classnames: Sequence[str]
    ) -> dict[str, tuple[int, ...]]:
        dv, dt = self._depths(backbone, cfg)
        shapes: dict[str, tuple[int, ...]] = {"text_ctx": (dt, cfg.n_ctx_text, backbone.text_width)}
        if dv:
            shapes["vision_ctx"] = (dv, cfg.n_ctx_vision, backbone.vision_width)
        return shapes

    def init(
        self, backbone: ClipBackbone, cfg: Any, classnames: Sequence[str], seed: int = 0
    ) -> dict[str, Tensor]:
        params = super().init(backbone, cfg, classnames, seed)
        # The reference initializes the layer-0 text context from the phrase when n <= 4.
        if cfg.ctx_init and cfg.n_ctx_text <= 4:
            params["text_ctx"][0] = phrase_vectors(backbone, cfg.ctx_init, cfg.n_ctx_text)
        return params

    def vision_prompts(
        self, params: Params, backbone: ClipBackbone, cfg: Any
    ) -> tuple[Tensor | None, Tensor | None]:
        # language-only: no tokens at all (the plain pass), never an empty [0, n, d] tensor
        return (params["vision_ctx"] if cfg.depth_vision else None), None

    def class_embeddings(
        self,
        params: Params,
        backbone: ClipBackbone,
        cfg: Any,
        classnames: Sequence[str],
        templates: Sequence[str],
    ) -> Tensor:
        n = cfg.n_ctx_text
        prefix = ctx_prefix(backbone, n, cfg.ctx_init if n <= 4 else "")
        text = prompt_text(backbone, classnames, prefix)
        feats = backbone.encode_text_embeddings(
            text.embeddings, text.pool_index, tokens=params["text_ctx"]
        )
        return normalize(feats)


class PromptSRCConfig(IVLPConfig):
    n_ctx_vision: int = Field(default=4, ge=0, le=64)
    n_ctx_text: int = Field(default=4, ge=1, le=64)
    depth_vision: int = Field(default=9, ge=0, le=64)
    depth_text: int = Field(default=9, ge=1, le=64)


class PromptSRC(IVLP):
    """Same prompts as IVLP at serving time; its self-regularization lives in training."""

    name = "promptsrc"
    Config = PromptSRCConfig
    source = "Khattak et al., Self-regulating Prompts (ICCV 2023); muzairkhattak/PromptSRC"
