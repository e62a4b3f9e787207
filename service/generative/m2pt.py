"""M²PT: multimodal prompt tuning (Wang et al., EMNLP 2024, arXiv 2409.15657) on a frozen LLaVA.

Parameters: deep visual prompts `[Lv, nv, d_vision]` (one set per vision layer, overwritten at
each), deep textual prompts `[Lt, nt, d_text]` (one set per decoder layer, written in prefill),
and optionally a copy of the projector's weights (`projector.<name>`), trained in place of the
frozen one. Defaults follow the paper's public code: 10 visual and 10 textual tokens, prompts in
every layer, projector frozen. The checkpoint format is the one every method uses; a checkpoint
names no classes (`classnames` is empty), because it answers instructions instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from service.backbones.llava import LlavaBackbone, Prompts
from service.errors import InvalidConfig
from service.prompts.base import MethodConfig

PROJECTOR_PREFIX = "projector."


class M2PTConfig(MethodConfig):
    n_visual: int = Field(default=10, ge=0, le=256, description="visual prompt tokens per layer")
    n_text: int = Field(default=10, ge=0, le=256, description="textual prompt tokens per layer")
    visual_depth: int | None = Field(default=None, ge=1, le=256, description="None: all layers")
    text_depth: int | None = Field(default=None, ge=1, le=512, description="None: all layers")
    train_projector: bool = False


@dataclass(frozen=True)
class GenSignature:
    """Plans with equal signatures share one batch (per-sample prompts are stacked)."""

    visual: tuple[int, int] = (0, 0)
    text: tuple[int, int] = (0, 0)
    projector: int = 0  # id of a trained projector: such plans batch only with themselves


@dataclass(eq=False)
class GenPlan:
    """An M²PT checkpoint's serving form (or the plain model's, with everything None)."""

    vision: Tensor | None = None  # [Lv, nv, d_vision]
    text: Tensor | None = None  # [Lt, nt, d_text]
    projector: dict[str, Tensor] | None = None
    labels: tuple[str, ...] = field(default=())

    @property
    def n_visual(self) -> int:
        """Visual prompts per layer: each image then fills `image_tokens(n_visual)` positions."""
        return 0 if self.vision is None else int(self.vision.shape[1])

    @property
    def signature(self) -> GenSignature:
        def dims(t: Tensor | None) -> tuple[int, int]:
            return (0, 0) if t is None else (int(t.shape[0]), int(t.shape[1]))

        proj = 0 if self.projector is None else id(self.projector)
        return GenSignature(dims(self.vision), dims(self.text), proj)

    def to(self, device: torch.device | str) -> GenPlan:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        proj = (
            None if self.projector is None else {k: v.to(device) for k, v in self.projector.items()}
        )
        return GenPlan(move(self.vision), move(self.text), proj, self.labels)

    @property
    def nbytes(self) -> int:
        tensors = [self.vision, self.text, *(self.projector or {}).values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


PLAIN_GEN_PLAN = GenPlan()


def batch_prompts(plans: Sequence[GenPlan], dtype: torch.dtype) -> Prompts:
    """Stack the per-sample prompts of plans that share one signature."""
    first = plans[0]
    if any(p.signature != first.signature for p in plans):
        raise ValueError("plans in one batch must share a signature")
    vision = None if first.vision is None else torch.stack([p.vision for p in plans]).to(dtype)  # type: ignore[misc]
    text = None if first.text is None else torch.stack([p.text for p in plans]).to(dtype)  # type: ignore[misc]
    proj = None
    if first.projector is not None:
        proj = {k: v.to(dtype) for k, v in first.projector.items()}
    return Prompts(vision, text, proj)


class M2PT:
    """The method: declared shapes, initialization and materialization (checkpoint -> GenPlan)."""

    name: ClassVar[str] = "m2pt"
    Config: ClassVar[type[M2PTConfig]] = M2PTConfig
    generative: ClassVar[bool] = True
    source: ClassVar[str] = "William-wAng618/M2PT"

    def config(self, raw: Mapping[str, Any] | None = None) -> M2PTConfig:
        try:
            return M2PTConfig.model_validate(dict(raw or {}))
        except Exception as exc:
            raise InvalidConfig(f"invalid m2pt config: {exc}") from exc

    def shapes(
        self, backbone: Any, cfg: M2PTConfig, classnames: Sequence[str] = ()
    ) -> dict[str, tuple[int, ...]]:
        if not isinstance(backbone, LlavaBackbone):
            raise InvalidConfig("m2pt checkpoints need a LLaVA backbone (--backbone llava)")
        out: dict[str, tuple[int, ...]] = {}
        if cfg.n_visual:
            depth = self._depth(cfg.visual_depth, backbone.vision_layers, "visual")
            out["visual_prompts"] = (depth, cfg.n_visual, backbone.vision_width)
        if cfg.n_text:
            depth = self._depth(cfg.text_depth, backbone.text_layers, "text")
            out["text_prompts"] = (depth, cfg.n_text, backbone.text_width)
        if cfg.train_projector:
            out.update({PROJECTOR_PREFIX + k: s for k, s in backbone.projector_shapes().items()})
        return out

    @staticmethod
    def _depth(depth: int | None, layers: int, which: str) -> int:
        if depth is None:
            return layers
        if depth > layers:
            raise InvalidConfig(f"{which}_depth {depth} exceeds the backbone's {layers} layers")
        return depth

    def init(
        self,
        backbone: LlavaBackbone,
        cfg: M2PTConfig,
        classnames: Sequence[str] = (),
        seed: int = 0,
    ) -> dict[str, Tensor]:
        """Prompts ~ N(0, 0.02); a trainable projector starts from the frozen one."""
        gen = torch.Generator().manual_seed(seed)
        params: dict[str, Tensor] = {}
        frozen = backbone.projector.state_dict()
        for key, shape in self.shapes(backbone, cfg).items():
            if key.startswith(PROJECTOR_PREFIX):
                params[key] = (
                    frozen[key.removeprefix(PROJECTOR_PREFIX)].detach().float().cpu().clone()
                )
            else:
                params[key] = torch.randn(shape, generator=gen) * 0.02
        return params

    def prompts(self, params: Mapping[str, Tensor], batch: int, dtype: torch.dtype) -> Prompts:
        """Differentiable per-batch prompts (training): the same tensors for every row."""

        def expand(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(dtype).unsqueeze(0).expand(batch, *t.shape)

        proj = {
            k.removeprefix(PROJECTOR_PREFIX): v.to(dtype)
            for k, v in params.items()
            if k.startswith(PROJECTOR_PREFIX)
        }
        return Prompts(
            expand(params.get("visual_prompts")), expand(params.get("text_prompts")), proj or None
        )

    @torch.no_grad()
    def materialize(
        self,
        params: Mapping[str, Tensor],
        backbone: LlavaBackbone,
        cfg: M2PTConfig,
        classnames: Sequence[str] = (),
        templates: Sequence[str] = (),
    ) -> GenPlan:
        def get(key: str) -> Tensor | None:
            t = params.get(key)
            return None if t is None else t.detach().to(backbone.device)

        proj = {
            k.removeprefix(PROJECTOR_PREFIX): v.detach().to(backbone.device)
            for k, v in params.items()
            if k.startswith(PROJECTOR_PREFIX)
        }
        return GenPlan(get("visual_prompts"), get("text_prompts"), proj or None)


GENERATIVE_METHODS: dict[str, M2PT] = {M2PT.name: M2PT()}
