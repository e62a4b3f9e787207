"""CoCoOp (Zhou et al., CVPR 2022; KaiyangZhou/CoOp): context plus an image-conditional shift.

A meta-net `Linear(e, e/16) -> ReLU -> Linear(e/16, d)` maps the normalized image feature to a
shift added to every context token, so the class embeddings depend on the image: CoCoOp is the
one method whose Plan carries a head instead of a fixed class matrix. Defaults are the published
ones (4 context tokens initialized from "a photo of a").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from pydantic import Field
from torch import Tensor, nn

from service.backbones.clip import ClipBackbone
from service.prompts.base import (
    DEFAULT_TEMPLATES,
    ClassifyObjective,
    PromptMethod,
    PromptText,
    context_size,
    ctx_prefix,
    default_linears,
    normalize,
    phrase_vectors,
    prompt_text,
)
from service.prompts.dassl import Converted, PromptLearnerLayout, context_phrase, f32, learner, take
from service.prompts.method import MethodConfig, Params
from service.prompts.plans import Plan
from service.prompts.recipe import Recipe


class CoCoOpConfig(MethodConfig):
    n_ctx: int = Field(default=4, ge=1, le=64)
    ctx_init: str = Field(default="a photo of a", max_length=200)


def meta_shift(params: Params, image_features: Tensor) -> Tensor:
    """The meta-net: normalized image features `[B, e]` -> context shift `[B, d]`."""
    h = torch.relu(
        nn.functional.linear(
            image_features, params["meta_net.linear1.weight"], params["meta_net.linear1.bias"]
        )
    )
    return nn.functional.linear(
        h, params["meta_net.linear2.weight"], params["meta_net.linear2.bias"]
    )


def conditional_classes(
    backbone: ClipBackbone, params: Params, text: PromptText, image_features: Tensor
) -> Tensor:
    """Normalized class embeddings per image `[B, C, e]`: one text pass over B*C prompts."""
    batch, n_cls = image_features.shape[0], text.embeddings.shape[0]
    shift = meta_shift(params, image_features.to(params["ctx"].dtype))
    ctx = params["ctx"][None] + shift[:, None]  # [B, n, d]
    tokens = ctx.repeat_interleave(n_cls, dim=0)[:, None]  # [B*C, 1, n, d]
    emb = text.embeddings.repeat(batch, 1, 1)
    feats = backbone.encode_text_embeddings(emb, text.pool_index.repeat(batch), tokens=tokens)
    return normalize(feats).view(batch, n_cls, -1)


def context_text(
    backbone: ClipBackbone, cfg: CoCoOpConfig, classnames: Sequence[str]
) -> PromptText:
    """The frozen prompt embeddings the context is written into."""
    return prompt_text(backbone, classnames, ctx_prefix(backbone, context_size(cfg), cfg.ctx_init))


class CoCoOpHead:
    """The image-conditional head of a materialized CoCoOp checkpoint."""

    def __init__(self, backbone: ClipBackbone, params: Params, text: PromptText) -> None:
        self.backbone, self.params, self.text = backbone, dict(params), text
        self.nbytes = sum(t.numel() * t.element_size() for t in self.params.values())

    def to(self, device: torch.device | str) -> CoCoOpHead:
        # The head runs the backbone's text tower, so it computes where the backbone is; only
        # its parameters move between residency tiers.
        params = {k: v.to(device) for k, v in self.params.items()}
        return CoCoOpHead(self.backbone, params, self.text)

    @torch.no_grad()
    def __call__(self, image_features: Tensor) -> Tensor:
        params = {k: v.to(self.backbone.device) for k, v in self.params.items()}
        return conditional_classes(self.backbone, params, self.text, image_features)


class CoCoOpLayout(PromptLearnerLayout):
    """KaiyangZhou/CoOp's CoCoOp prompt learner: `ctx` and the meta-net's two layers."""

    title = "CoCoOp"
    KEYS = ("ctx", *(f"meta_net.linear{i}.{p}" for i in (1, 2) for p in ("weight", "bias")))

    def prompt_keys(self, keys: set[str], prefix: str) -> tuple[list[str], set[str]]:
        required = [prefix + k for k in self.KEYS]
        return required, set(required)

    def convert(self, state: Mapping[str, Tensor], ctx_init: str | None) -> Converted:
        s = learner(state)
        params = {k: f32(v) for k, v in s.items() if k == "ctx" or k.startswith("meta_net.")}
        n = take(s, "ctx").shape[0]
        return params, {"n_ctx": n, "ctx_init": context_phrase(ctx_init, n)}


class CoCoOp(PromptMethod[CoCoOpConfig]):
    name = "cocoop"
    Config = CoCoOpConfig
    recipe = Recipe(lr=0.002, epochs=10, batch_size=1)
    source = "Zhou et al., Conditional Prompt Learning for Vision-Language Models (CVPR 2022)"
    importer = CoCoOpLayout()

    def shapes(
        self, backbone: ClipBackbone, cfg: CoCoOpConfig, classnames: Sequence[str]
    ) -> dict[str, tuple[int, ...]]:
        e, d = backbone.embed_dim, backbone.text_width
        hidden = e // 16
        return {
            "ctx": (context_size(cfg), d),
            "meta_net.linear1.weight": (hidden, e),
            "meta_net.linear1.bias": (hidden,),
            "meta_net.linear2.weight": (d, hidden),
            "meta_net.linear2.bias": (d,),
        }

    def init(
        self, backbone: ClipBackbone, cfg: CoCoOpConfig, classnames: Sequence[str], seed: int = 0
    ) -> dict[str, Tensor]:
        e, d = backbone.embed_dim, backbone.text_width
        (first,), (second,) = (
            default_linears(seed, e, e // 16),
            default_linears(seed + 1, e // 16, d),
        )
        params = super().init(backbone, cfg, classnames, seed)
        params.update(
            {
                "meta_net.linear1.weight": first.weight.detach().clone(),
                "meta_net.linear1.bias": first.bias.detach().clone(),
                "meta_net.linear2.weight": second.weight.detach().clone(),
                "meta_net.linear2.bias": second.bias.detach().clone(),
            }
        )
        if cfg.ctx_init:
            params["ctx"] = phrase_vectors(backbone, cfg.ctx_init, context_size(cfg))
        return params

    def class_embeddings(
        self,
        params: Params,
        backbone: ClipBackbone,
        cfg: CoCoOpConfig,
        classnames: Sequence[str],
        templates: Sequence[str],
    ) -> Tensor:
        # Without an image the shift is the meta-net of a zero feature; training and serving
        # use `conditional_classes` instead. Kept for the contract (e.g. inspecting labels).
        text = context_text(backbone, cfg, classnames)
        zero = torch.zeros(1, backbone.embed_dim, device=backbone.device)
        return conditional_classes(backbone, params, text, zero)[0]

    @torch.no_grad()
    def materialize(
        self,
        params: Params,
        backbone: ClipBackbone,
        cfg: CoCoOpConfig,
        classnames: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
    ) -> Plan:
        params = {k: v.to(backbone.device) for k, v in params.items()}
        head = CoCoOpHead(backbone, params, context_text(backbone, cfg, classnames))
        return Plan(labels=tuple(classnames), logit_scale=backbone.logit_scale, head=head)

    def objective(
        self,
        backbone: ClipBackbone,
        cfg: CoCoOpConfig,
        classnames: Sequence[str],
        templates: Sequence[str],
        recipe: Recipe,
        seed: int,
    ) -> ClassifyObjective[CoCoOpConfig]:
        """Cross-entropy of the image-conditional logits, as served by `CoCoOpHead`."""
        return ConditionalObjective(self, backbone, cfg, classnames, templates, recipe, seed)


class ConditionalObjective(ClassifyObjective[CoCoOpConfig]):
    """Each image's own class embeddings (the meta-net's shift of the context)."""

    _text: PromptText | None = None  # the frozen prompt embeddings: built once, not per step

    def loss(self, params: Params, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.features(params, images)
        if self._text is None:
            self._text = context_text(self.bb, self.cfg, self.classnames)
        per_image = conditional_classes(self.bb, params, self._text, feats)
        logits = self.scale * torch.einsum("be,bce->bc", feats, per_image)
        return nn.functional.cross_entropy(logits, labels), logits
