"""The base of the CLIP prompt methods (`PromptMethod`) and the text helpers they share.

A CLIP method declares its parameters for a `ClipBackbone`, computes (differentiably, for
training) its vision prompts and class embeddings, and `materialize`s them once per checkpoint
version into a `Plan` (plans.py). Its default training objective is the cross-entropy of exactly
the serving computation; methods with more to their loss (CoCoOp, dual-view, PromptSRC) refine
`ClassifyObjective` in their own module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.backbones.base import Capability
from service.backbones.clip import ClipBackbone
from service.backbones.prompted import Placement
from service.prompts.method import MethodBase, MethodConfig, Params, Step
from service.prompts.plans import Plan
from service.prompts.recipe import Recipe

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
C = TypeVar("C", bound=MethodConfig)


class PromptMethod(MethodBase[C], ABC):
    """A CLIP prompt-learning method: parameters, initialization, objective, and its Plan."""

    backbone_kind: ClassVar[str] = ClipBackbone.kind
    task: ClassVar[Capability] = "classify"
    placement: ClassVar[Placement] = "append"

    @abstractmethod
    def shapes(
        self, backbone: ClipBackbone, cfg: C, classnames: Sequence[str]
    ) -> dict[str, tuple[int, ...]]:
        """Name -> exact shape of every trainable tensor for this backbone (all float32)."""

    def init(
        self, backbone: ClipBackbone, cfg: C, classnames: Sequence[str], seed: int = 0
    ) -> dict[str, Tensor]:
        """Initial parameters; the default is N(0, 0.02), as the reference prompt learners do."""
        gen = torch.Generator().manual_seed(seed)
        return {
            k: torch.randn(shape, generator=gen) * 0.02
            for k, shape in self.shapes(backbone, cfg, classnames).items()
        }

    def vision_prompts(
        self, params: Params, backbone: ClipBackbone, cfg: C
    ) -> tuple[Tensor | None, Tensor | None]:
        """Deep vision tokens `[L, n, d]` and biases `[L, d]` (differentiable); none by default."""
        return None, None

    @abstractmethod
    def class_embeddings(
        self,
        params: Params,
        backbone: ClipBackbone,
        cfg: C,
        classnames: Sequence[str],
        templates: Sequence[str],
    ) -> Tensor:
        """Normalized class embeddings `[C, e]` (differentiable in the params)."""

    @torch.no_grad()
    def materialize(
        self,
        params: Params,
        backbone: ClipBackbone,
        cfg: C,
        classnames: Sequence[str],
        templates: Sequence[str] = (),
    ) -> Plan:
        """The serving form: text features computed here, once per checkpoint version."""
        params = {k: v.to(backbone.device) for k, v in params.items()}
        tokens, bias = self.vision_prompts(params, backbone, cfg)
        classes = self.class_embeddings(
            params, backbone, cfg, classnames, tuple(templates) or DEFAULT_TEMPLATES
        )
        return Plan(
            labels=tuple(classnames),
            logit_scale=backbone.logit_scale,
            classes=classes.float(),
            vision_tokens=None if tokens is None else tokens.detach(),
            vision_bias=None if bias is None else bias.detach(),
            placement=self.placement,
        )

    def objective(
        self,
        backbone: ClipBackbone,
        cfg: C,
        classnames: Sequence[str],
        templates: Sequence[str],
        recipe: Recipe,
        seed: int,
    ) -> ClassifyObjective[C]:
        """Cross-entropy of the serving logits (methods with more to their loss refine it)."""
        return ClassifyObjective(self, backbone, cfg, classnames, templates, recipe, seed)


class ClassifyObjective(Generic[C]):
    """Cross-entropy over `(images, labels)` batches of the logits serving computes: image
    features under the method's vision prompts against its class embeddings."""

    def __init__(
        self,
        method: PromptMethod[C],
        backbone: ClipBackbone,
        cfg: C,
        classnames: Sequence[str],
        templates: Sequence[str],
        recipe: Recipe,
        seed: int,
    ) -> None:
        self.m, self.bb, self.cfg, self.recipe = method, backbone, cfg, recipe
        self.classnames, self.templates = list(classnames), tuple(templates) or DEFAULT_TEMPLATES
        self.scale = backbone.logit_scale
        self.gen = torch.Generator().manual_seed(seed)  # for objectives that draw at random
        self._fixed_classes: Tensor | None = None

    def step(self, params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Step:
        """Loss and hits of one `(images, labels)` batch."""
        images, labels = (t.to(self.bb.device) for t in batch)
        loss, logits = self.loss(params, images, labels)
        return Step(loss, float((logits.argmax(-1) == labels).sum()), len(labels))

    def features(self, params: Params, images: Tensor) -> Tensor:
        """Normalized image features `[B, e]` under the method's vision prompts."""
        tokens, bias = self.m.vision_prompts(params, self.bb, self.cfg)
        feats = self.bb.encode_image(images, tokens, bias, self.m.placement)
        return F.normalize(feats.float(), dim=-1)

    def classes(self, params: Params) -> Tensor:
        """Class embeddings `[C, e]`; computed once when the text side is frozen (VPT)."""
        if self._fixed_classes is not None:
            return self._fixed_classes
        out = self.m.class_embeddings(params, self.bb, self.cfg, self.classnames, self.templates)
        if not out.requires_grad:  # a frozen text side (VPT, vision-only bias): compute once
            self._fixed_classes = out.detach()
        return out

    def loss(self, params: Params, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Loss and logits `[B, C]` of one batch (on the backbone's device)."""
        logits = self.scale * self.features(params, images) @ self.classes(params).t()
        return F.cross_entropy(logits, labels), logits


def default_linears(seed: int, n_in: int, n_out: int, count: int = 1) -> list[nn.Linear]:
    """`count` Linear layers with PyTorch's default init (as the references' projections get),
    seeded without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [nn.Linear(n_in, n_out) for _ in range(count)]


# --- text helpers shared by the methods --------------------------------------------------------


def readable(classname: str) -> str:
    """Class names as the reference code writes them into prompts (underscores -> spaces)."""
    return classname.replace("_", " ")


def normalize(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


def template_prompts(classnames: Sequence[str], template: str) -> list[str]:
    """The hand-crafted prompts of one template, one per class."""
    return [template.format(readable(c)) for c in classnames]


def ensemble(per_template: Iterable[Tensor]) -> Tensor:
    """CLIP's prompt ensembling: the mean of each template's normalized features, renormalized
    (the mean's 1/T disappears in the renormalization)."""
    total = None
    for feats in per_template:
        feats = normalize(feats)
        total = feats if total is None else total + feats
    if total is None:
        raise ValueError("ensemble needs at least one template")
    return normalize(total)


def template_embeddings(
    backbone: ClipBackbone,
    classnames: Sequence[str],
    templates: Sequence[str],
    bias: Tensor | None = None,
) -> Tensor:
    """Class embeddings `[C, e]` from hand-crafted templates, ensembled (`ensemble`)."""
    return ensemble(
        backbone.encode_text_ids(backbone.tokenize(template_prompts(classnames, t)), bias=bias)
        for t in templates
    )


@dataclass(frozen=True)
class PromptText:
    """Frozen token embeddings of `"{prefix} {class}."` per class, with the pooled index.

    Context tokens overwrite positions [1, 1+n); with an init phrase longer than n (MaPLe's 2
    tokens from "a photo of a"), the rest of the phrase stays as fixed words, as in the reference.
    """

    ids: Tensor
    embeddings: Tensor
    pool_index: Tensor


def prompt_text(backbone: ClipBackbone, classnames: Sequence[str], prefix: str) -> PromptText:
    ids = backbone.tokenize([f"{prefix} {readable(c)}." for c in classnames])
    with torch.no_grad():
        emb = backbone.embed_tokens(ids)
    return PromptText(ids, emb, backbone.text.pool_index(ids))


class ContextConfig(Protocol):
    """The config of a CoOp-style context: its length and the phrase it starts from."""

    n_ctx: int
    ctx_init: str


def context_size(cfg: ContextConfig) -> int:
    """Context tokens of a CoOp-style prompt: with an init phrase the reference counts its *words*
    (`len(ctx_init.split(" "))`); any extra BPE tokens of the phrase stay fixed after the
    context, exactly as there."""
    return len(cfg.ctx_init.split(" ")) if cfg.ctx_init else int(cfg.n_ctx)


def ctx_prefix(backbone: ClipBackbone, n_ctx: int, ctx_init: str) -> str:
    """The words the context replaces: the init phrase, or n placeholder tokens."""
    return ctx_init.replace("_", " ") if ctx_init else " ".join(["X"] * n_ctx)


def phrase_vectors(backbone: ClipBackbone, phrase: str, n_ctx: int) -> Tensor:
    """Token embeddings of the first n_ctx tokens of a phrase (context initialization)."""
    ids = backbone.tokenize([phrase.replace("_", " ")])
    with torch.no_grad():
        return backbone.embed_tokens(ids)[0, 1 : 1 + n_ctx].float().cpu().clone()


def phrase_length(backbone: ClipBackbone, phrase: str) -> int:
    """Number of BPE tokens of a phrase (without start/end tokens)."""
    ids = backbone.tokenize([phrase.replace("_", " ")])[0]
    return int(backbone.text.pool_index(ids[None])[0].item()) - 1
