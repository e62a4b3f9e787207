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

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.errors import MissingTensor
from service.prompts.base import (
    ClassifyObjective,
    PromptMethod,
    ctx_prefix,
    normalize,
    phrase_vectors,
    prompt_text,
    template_embeddings,
)
from service.prompts.dassl import (
    DEEP,
    LEARNER,
    ZS_PREFIX,
    Converted,
    DasslLayout,
    backbone_key,
    deep_keys,
    deep_stack,
    take,
)
from service.prompts.losses import promptsrc_regularizers
from service.prompts.method import MethodConfig, Params
from service.prompts.recipe import Recipe
from service.prompts.zeroshot import TEMPLATE_SETS


class VPTConfig(MethodConfig):
    n_ctx_vision: int = Field(default=8, ge=1, le=64)
    depth_vision: int = Field(default=12, ge=1, le=64)


class VPTLayout(DasslLayout):
    """multimodal-prompt-learning's VPT: the whole model, `image_encoder.VPT` (layer 0) and the
    image blocks' `VPT_shallow`; no prompt learner (no buffers), the text side hand-crafted."""

    title = "VPT"
    templates = ("a photo of a {}.",)

    def prefix(self, keys: set[str]) -> str:
        return ""

    def buffers(self, prefix: str) -> set[str]:
        return set()

    def prompt_keys(self, keys: set[str], prefix: str) -> tuple[list[str], set[str]]:
        return ["image_encoder.VPT"], {"image_encoder.VPT"} | deep_keys(keys, "image")

    def convert(self, state: Mapping[str, Tensor], ctx_init: str | None) -> Converted:
        vision = deep_stack(state, "image", take(state, "image_encoder.VPT"))
        return {"vision_ctx": vision}, {
            "n_ctx_vision": vision.shape[1],
            "depth_vision": len(vision),
        }


class VPTDeep(PromptMethod[VPTConfig]):
    name = "vpt"
    importer = VPTLayout()
    Config = VPTConfig
    recipe = Recipe(lr=0.0025, epochs=5, batch_size=4)
    source = "Jia et al., Visual Prompt Tuning (ECCV 2022); layout of multimodal-prompt-learning"

    def _depth(self, backbone: ClipBackbone, cfg: VPTConfig) -> int:
        # The published default (12) means "every layer" of ViT-B; smaller backbones clamp.
        return min(int(cfg.depth_vision), backbone.vision_layers)

    def shapes(
        self, backbone: ClipBackbone, cfg: VPTConfig, classnames: Sequence[str]
    ) -> dict[str, tuple[int, ...]]:
        return {"vision_ctx": (self._depth(backbone, cfg), cfg.n_ctx_vision, backbone.vision_width)}

    def vision_prompts(
        self, params: Params, backbone: ClipBackbone, cfg: VPTConfig
    ) -> tuple[Tensor | None, Tensor | None]:
        return params["vision_ctx"], None

    def class_embeddings(
        self,
        params: Params,
        backbone: ClipBackbone,
        cfg: VPTConfig,
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


class IVLPLayout(DasslLayout):
    """The whole model: the text context `prompt_learner.ctx` and the text blocks' `VPT_shallow`,
    and, unless the run prompted language only (PROMPT_DEPTH_VISION 0), VPT's vision prompts."""

    title = "IVLP"

    def prompt_keys(self, keys: set[str], prefix: str) -> tuple[list[str], set[str]]:
        deep = deep_keys(keys, "image") | deep_keys(keys, "text")
        return [prefix + "ctx"], {prefix + "ctx", "image_encoder.VPT"} | deep

    def convert(self, state: Mapping[str, Tensor], ctx_init: str | None) -> Converted:
        text = deep_stack(state, "text", take(state, LEARNER + "ctx"))
        params = {"text_ctx": text}
        n_vision = depth_vision = 0
        if "image_encoder.VPT" in state:
            vision = deep_stack(state, "image", take(state, "image_encoder.VPT"))
            params["vision_ctx"] = vision
            n_vision, depth_vision = vision.shape[1], len(vision)
        elif any((m := DEEP.match(k)) and m.group(1) == "image" for k in state):
            raise MissingTensor(
                "deeper image prompts without image_encoder.VPT, the layer-0 prompt"
            )
        return params, {
            "n_ctx_vision": n_vision,
            "depth_vision": depth_vision,
            "n_ctx_text": text.shape[1],
            "depth_text": len(text),
            "ctx_init": "a photo of a" if ctx_init is None else ctx_init,
        }


class IVLP(PromptMethod[IVLPConfig]):
    name = "ivlp"
    importer: DasslLayout = IVLPLayout()
    Config = IVLPConfig
    recipe = Recipe(lr=0.0035, epochs=5, batch_size=4)
    source = "Khattak et al., MaPLe (CVPR 2023) baseline IVLP; multimodal-prompt-learning"

    def _depths(self, backbone: ClipBackbone, cfg: IVLPConfig) -> tuple[int, int]:
        # depth_vision 0 never asks for the image tower's layers: language-only runs on any tower
        dv = int(cfg.depth_vision)
        return (
            min(dv, backbone.vision_layers) if dv else 0,
            min(int(cfg.depth_text), backbone.text_layers),
        )

    def shapes(
        self, backbone: ClipBackbone, cfg: IVLPConfig, classnames: Sequence[str]
    ) -> dict[str, tuple[int, ...]]:
        dv, dt = self._depths(backbone, cfg)
        shapes: dict[str, tuple[int, ...]] = {"text_ctx": (dt, cfg.n_ctx_text, backbone.text_width)}
        if dv:
            shapes["vision_ctx"] = (dv, cfg.n_ctx_vision, backbone.vision_width)
        return shapes

    def init(
        self, backbone: ClipBackbone, cfg: IVLPConfig, classnames: Sequence[str], seed: int = 0
    ) -> dict[str, Tensor]:
        params = super().init(backbone, cfg, classnames, seed)
        # The reference initializes the layer-0 text context from the phrase when n <= 4.
        if cfg.ctx_init and cfg.n_ctx_text <= 4:
            params["text_ctx"][0] = phrase_vectors(backbone, cfg.ctx_init, cfg.n_ctx_text)
        return params

    def vision_prompts(
        self, params: Params, backbone: ClipBackbone, cfg: IVLPConfig
    ) -> tuple[Tensor | None, Tensor | None]:
        # language-only: no tokens at all (the plain pass), never an empty [0, n, d] tensor
        return (params["vision_ctx"] if cfg.depth_vision else None), None

    def class_embeddings(
        self,
        params: Params,
        backbone: ClipBackbone,
        cfg: IVLPConfig,
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


DEFAULT_GPA_EPOCHS = 50  # the longest PromptSRC schedule (used when the file has no epoch)
MAX_GPA_EPOCHS = 200  # the longest schedule in the reference configs (CoOp, 200 epochs)


class PromptSRCLayout(IVLPLayout):
    """IVLP's prompts, and the frozen CLIP image tower its regularizer used (`ZS_PREFIX`), always
    saved with the frozen CLIP; every tensor averaged over the epochs (Gaussian prompt
    aggregation), the frozen ones included (service/importers/frozen.py bounds the rounding)."""

    title = "PromptSRC"
    zero_shot_tower = True

    def frozen_ok(self, keys: set[str]) -> str | None:
        zs = any(k.startswith(ZS_PREFIX) for k in keys)
        frozen_clip = any(backbone_key(k) and not k.startswith(ZS_PREFIX) for k in keys)
        if frozen_clip and not zs:
            return (
                "promptsrc saves its frozen prompt_learner.ZS_image_encoder with the frozen "
                "CLIP; this file has the frozen CLIP without it"
            )
        return None

    def averaged_epochs(self, epoch: object) -> int:
        if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1:
            return min(epoch, MAX_GPA_EPOCHS)
        return DEFAULT_GPA_EPOCHS


class PromptSRC(IVLP):
    """Same prompts as IVLP at serving time; its self-regularization lives in training."""

    name = "promptsrc"
    importer = PromptSRCLayout()
    Config = PromptSRCConfig
    recipe = Recipe(
        lr=0.0025, epochs=20, batch_size=4, text_loss_weight=25.0, image_loss_weight=10.0,
        gpa_mean=15.0, gpa_std=1.0,
    )  # fmt: skip
    source = "Khattak et al., Self-regulating Prompts (ICCV 2023); muzairkhattak/PromptSRC"

    def objective(
        self,
        backbone: ClipBackbone,
        cfg: IVLPConfig,
        classnames: Sequence[str],
        templates: Sequence[str],
        recipe: Recipe,
        seed: int,
    ) -> ClassifyObjective[IVLPConfig]:
        """Cross-entropy plus the self-regularization against the frozen model."""
        return SelfRegulating(self, backbone, cfg, classnames, templates, recipe, seed)


class SelfRegulating(ClassifyObjective[IVLPConfig]):
    """PromptSRC's loss: cross-entropy + L1 of text and image features to the frozen model's
    (`text_loss_weight`, `image_loss_weight`) + KL of the logits to the frozen model's. The
    frozen text side is CLIP's 80-template ensemble unless the run names several templates."""

    _frozen_text: Tensor | None = None

    def frozen_text(self) -> Tensor:
        if self._frozen_text is None:
            with torch.no_grad():
                templates = (
                    self.templates if len(self.templates) > 1 else TEMPLATE_SETS["imagenet80"]
                )
                self._frozen_text = template_embeddings(self.bb, self.classnames, templates)
        return self._frozen_text

    def loss(self, params: Params, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.features(params, images)
        classes = self.classes(params)
        logits = self.scale * feats @ classes.t()
        with torch.no_grad():
            frozen_img = F.normalize(self.bb.encode_image(images).float(), dim=-1)
            frozen_logits = self.scale * frozen_img @ self.frozen_text().t()
        loss = F.cross_entropy(logits, labels) + promptsrc_regularizers(
            classes, self.frozen_text(), feats, frozen_img, logits, frozen_logits,
            self.recipe.text_loss_weight, self.recipe.image_loss_weight,
        )  # fmt: skip
        return loss, logits
