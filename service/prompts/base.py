"""The Plan every prompt method materializes into, and the `PromptMethod` contract.

At serving time the engine never knows method names: it sees a `Plan` (vision-side deep tokens
and biases, a class matrix or an image-conditional head, labels) and a `Signature` that says which
plans may share one encoder pass. A method is one module: it declares its parameters for a
backbone, initializes them, computes (differentiably, for training) its vision prompts and class
embeddings, and `materialize`s them once per checkpoint version.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from service.backbones.clip import ClipBackbone
from service.backbones.prompted import Placement
from service.errors import InvalidConfig

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


@dataclass(frozen=True)
class Signature:
    """Placement and shapes of a plan's vision-side tokens: equal signatures share a pass.

    Biases are not part of it: a plan without biases joins a biased batch with zero biases, which
    is a no-op. Tokens are: zero tokens are still attended to.
    """

    depth: int = 0
    n_tokens: int = 0
    placement: str = "append"


PLAIN = Signature()


class ClassHead(Protocol):
    """An image-conditional classifier (CoCoOp): class embeddings per image."""

    def __call__(self, image_features: Tensor) -> Tensor:
        """Normalized image features `[B, e]` -> normalized class embeddings `[B, C, e]`."""
        ...


@dataclass(eq=False)
class Plan:
    """What a checkpoint version is at serving time; immutable once built."""

    labels: tuple[str, ...]
    logit_scale: float
    classes: Tensor | None = None  # [C, e], L2-normalized
    head: ClassHead | None = None  # image-conditional alternative to `classes`
    vision_tokens: Tensor | None = None  # [L, n, d_vision]
    vision_bias: Tensor | None = None  # [L, d_vision]
    placement: Placement = "append"

    def __post_init__(self) -> None:
        if (self.classes is None) == (self.head is None):
            raise ValueError("a Plan has exactly one of `classes` and `head`")

    @property
    def signature(self) -> Signature:
        if self.vision_tokens is None:
            return PLAIN
        depth, n, _ = self.vision_tokens.shape
        return Signature(depth, n, self.placement)

    def logits(self, image_features: Tensor) -> Tensor:
        """Logits `[B, C]` from normalized image features `[B, e]`: one matrix product."""
        feats = image_features.to(torch.float32)
        if self.classes is not None:
            return self.logit_scale * feats @ self.classes.to(feats.device).t()
        assert self.head is not None
        per_image = self.head(feats)
        return self.logit_scale * torch.einsum("be,bce->bc", feats, per_image)

    def to(self, device: torch.device | str) -> Plan:
        """The same plan with its tensors on `device` (residency moves plans between tiers)."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        move_head = getattr(self.head, "to", None)
        head = move_head(device) if move_head is not None else self.head
        return Plan(
            labels=self.labels,
            logit_scale=self.logit_scale,
            classes=move(self.classes),
            head=head,
            vision_tokens=move(self.vision_tokens),
            vision_bias=move(self.vision_bias),
            placement=self.placement,
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the plan's tensors (what residency budgets count)."""
        tensors = [self.classes, self.vision_tokens, self.vision_bias]
        extra = getattr(self.head, "nbytes", 0)
        return extra + sum(t.numel() * t.element_size() for t in tensors if t is not None)


class MethodConfig(BaseModel):
    """Base of every method's hyperparameters: unknown keys are errors, values are bounded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Params = Mapping[str, Tensor]


class PromptMethod(ABC):
    """One prompt-learning method: parameters, initialization, and how they become a Plan."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    placement: ClassVar[Placement] = "append"
    source: ClassVar[str] = ""

    def config(self, raw: Mapping[str, Any] | None = None) -> Any:
        """Validated config with the published defaults filled in."""
        try:
            return self.Config.model_validate(dict(raw or {}))
        except ValidationError as exc:
            raise InvalidConfig(f"invalid {self.name} config: {exc}") from exc

    @abstractmethod
    def shapes(
        self, backbone: ClipBackbone, cfg: Any, classnames: Sequence[str]
    ) -> dict[str, tuple[int, ...]]:
        """Name -> exact shape of every trainable tensor for this backbone (all float32)."""

    def init(
        self, backbone: ClipBackbone, cfg: Any, classnames: Sequence[str], seed: int = 0
    ) -> dict[str, Tensor]:
        """Initial parameters; the default is N(0, 0.02), as the reference prompt learners do."""
        gen = torch.Generator().manual_seed(seed)
        return {
            k: torch.randn(shape, generator=gen) * 0.02
            for k, shape in self.shapes(backbone, cfg, classnames).items()
        }

    def vision_prompts(
        self, params: Params, backbone: ClipBackbone, cfg: Any
    ) -> tuple[Tensor | None, Tensor | None]:
        """Deep vision tokens `[L, n, d]` and biases `[L, d]` (differentiable); none by default."""
        return None, None

    @abstractmethod
    def class_embeddings(
        self,
        params: Params,
        backbone: ClipBackbone,
        cfg: Any,
        classnames: Sequence[str],
        templates: Sequence[str],
    ) -> Tensor:
        """Normalized class embeddings `[C, e]` (differentiable in the params)."""

    @torch.no_grad()
    def materialize(
        self,
        params: Params,
        backbone: ClipBackbone,
        cfg: Any,
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


def context_size(cfg: Any) -> int:
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
