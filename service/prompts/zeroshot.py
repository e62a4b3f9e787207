"""Zero-shot CLIP: hand-crafted templates, ensembled over templates (no trainable parameters).

Template sets: the per-dataset templates of the CoOp benchmark (KaiyangZhou/CoOp, zsclip.py) and
CLIP's 80-template ImageNet ensemble (shipped by open_clip as OPENAI_IMAGENET_TEMPLATES).
"""

from __future__ import annotations

from collections.abc import Sequence

from open_clip import OPENAI_IMAGENET_TEMPLATES
from pydantic import Field, field_validator
from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.prompts.base import PromptMethod, template_embeddings
from service.prompts.method import MethodConfig, Params

# The CoOp benchmark's hand-crafted prompt per dataset (the "CLIP" rows of its tables).
DATASET_TEMPLATES: dict[str, str] = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
}

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet80": tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES),
    **{name: (template,) for name, template in DATASET_TEMPLATES.items()},
}


def resolve_templates(template_set: str | None, templates: Sequence[str]) -> tuple[str, ...]:
    """A named set wins over explicit templates; explicit ones over the default."""
    if template_set:
        return TEMPLATE_SETS[template_set]
    return tuple(templates)


class ZeroShotConfig(MethodConfig):
    template_set: str | None = Field(default=None, description="named set, e.g. imagenet80")

    @field_validator("template_set")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in TEMPLATE_SETS:
            raise ValueError(f"unknown template set {v!r}; known: {sorted(TEMPLATE_SETS)}")
        return v


class ZeroShot(PromptMethod[ZeroShotConfig]):
    """Nothing to train (no recipe): a checkpoint names its classes and templates."""

    name = "zeroshot"
    Config = ZeroShotConfig
    source = "Radford et al. 2021 (CLIP); templates from KaiyangZhou/CoOp and open_clip"

    def shapes(
        self, backbone: ClipBackbone, cfg: ZeroShotConfig, classnames: Sequence[str]
    ) -> dict[str, tuple[int, ...]]:
        return {}

    def class_embeddings(
        self,
        params: Params,
        backbone: ClipBackbone,
        cfg: ZeroShotConfig,
        classnames: Sequence[str],
        templates: Sequence[str],
    ) -> Tensor:
        return template_embeddings(
            backbone, classnames, resolve_templates(cfg.template_set, templates)
        )
