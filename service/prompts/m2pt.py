"""M²PT: multimodal prompt tuning (Wang et al., EMNLP 2024, arXiv 2409.15657) on a frozen LLaVA.

Parameters: deep visual prompts `[Lv, nv, d_vision]` (one set per vision layer, overwritten at
each), deep textual prompts `[Lt, nt, d_text]` (one set per decoder layer, written in prefill),
and optionally a copy of the projector's weights (`projector.<name>`), trained in place of the
frozen one. Defaults follow the paper's public code: 10 visual and 10 textual tokens, prompts in
every layer, projector frozen. The checkpoint format is the one every method uses; a checkpoint
names no classes (`classnames` is empty), because it answers instructions instead.

Training (its objective below): every assistant turn of a conversation is one sample; the loss is
the token cross-entropy of the answer (plus the end-of-sequence token) given the conversation
before it, with only the prompts (and, with `train_projector`, the projector copy) trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field
from torch import Tensor

from service.backbones.base import Capability
from service.backbones.llava import LlavaBackbone, Prompts
from service.errors import InvalidConfig
from service.prompts.method import MethodBase, MethodConfig, Step
from service.prompts.recipe import Recipe

PROJECTOR_PREFIX = "projector."


class M2PTOutput:
    """M²PT's importer hook: the reference's `train_PT.py` output directory (the whole model's
    weights), read by service/importers/m2pt.py."""

    reference: ClassVar[str] = "William-wAng618/M2PT"


class M2PTConfig(MethodConfig):
    n_visual: int = Field(default=10, ge=0, le=256, description="visual prompt tokens per layer")
    n_text: int = Field(default=10, ge=0, le=256, description="textual prompt tokens per layer")
    visual_depth: int | None = Field(default=None, ge=1, le=256, description="None: all layers")
    text_depth: int | None = Field(default=None, ge=1, le=512, description="None: all layers")
    train_projector: bool = False


@dataclass(frozen=True)
class AnswerSignature:
    """Plans with equal signatures share one batch (per-sample prompts are stacked)."""

    visual: tuple[int, int] = (0, 0)
    text: tuple[int, int] = (0, 0)
    projector: int = 0  # id of a trained projector: such plans batch only with themselves


@dataclass(eq=False)
class AnswerPlan:
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
    def signature(self) -> AnswerSignature:
        def dims(t: Tensor | None) -> tuple[int, int]:
            return (0, 0) if t is None else (int(t.shape[0]), int(t.shape[1]))

        proj = 0 if self.projector is None else id(self.projector)
        return AnswerSignature(dims(self.vision), dims(self.text), proj)

    def to(self, device: torch.device | str) -> AnswerPlan:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        proj = (
            None if self.projector is None else {k: v.to(device) for k, v in self.projector.items()}
        )
        return AnswerPlan(move(self.vision), move(self.text), proj, self.labels)

    @property
    def nbytes(self) -> int:
        tensors = [self.vision, self.text, *(self.projector or {}).values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


PLAIN_ANSWER_PLAN = AnswerPlan()


def batch_prompts(plans: Sequence[AnswerPlan], dtype: torch.dtype) -> Prompts:
    """Stack the per-sample prompts of plans that share one signature."""
    first = plans[0]
    if any(p.signature != first.signature for p in plans):
        raise ValueError("plans in one batch must share a signature")
    vision, text = _rows([p.vision for p in plans], dtype), _rows([p.text for p in plans], dtype)
    proj = None
    if first.projector is not None:
        proj = {k: v.to(dtype) for k, v in first.projector.items()}
    return Prompts(vision, text, proj)


def _rows(tensors: Sequence[Tensor | None], dtype: torch.dtype) -> Tensor | None:
    """`[B, ...]` per-row prompts; one shared tensor (every row the same checkpoint) is broadcast
    as a view, not copied B times."""
    first = tensors[0]
    if first is None:
        return None
    if all(t is first for t in tensors):
        return first.to(dtype).unsqueeze(0).expand(len(tensors), *first.shape)
    return torch.stack([t for t in tensors if t is not None]).to(dtype)


class M2PT(MethodBase[M2PTConfig]):
    """The method: shapes, initialization, materialization (checkpoint -> AnswerPlan), loss."""

    name = "m2pt"
    Config = M2PTConfig
    backbone_kind: ClassVar[str] = LlavaBackbone.kind
    task: ClassVar[Capability] = "answer"
    # Our choice where the paper's code is not read here: AdamW without decay, a few epochs, a
    # constant learning rate, full precision.
    recipe = Recipe(
        lr=7e-4, epochs=3, batch_size=4, optimizer="adamw", weight_decay=0.0, warmup_epochs=0,
        schedule="constant", mixed_precision="off",
    )  # fmt: skip
    source = "Wang et al., M²PT (EMNLP 2024); William-wAng618/M2PT"
    importer = M2PTOutput()

    def shapes(
        self, backbone: LlavaBackbone, cfg: M2PTConfig, classnames: Sequence[str] = ()
    ) -> dict[str, tuple[int, ...]]:
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
    ) -> AnswerPlan:
        def get(key: str) -> Tensor | None:
            t = params.get(key)
            return None if t is None else t.detach().to(backbone.device)

        proj = {
            k.removeprefix(PROJECTOR_PREFIX): v.detach().to(backbone.device)
            for k, v in params.items()
            if k.startswith(PROJECTOR_PREFIX)
        }
        return AnswerPlan(get("visual_prompts"), get("text_prompts"), proj or None)

    def objective(
        self,
        backbone: LlavaBackbone,
        cfg: M2PTConfig,
        classnames: Sequence[str],
        templates: Sequence[str],
        recipe: Recipe,
        seed: int,
    ) -> AnswerObjective:
        """Cross-entropy of the answer tokens under the prompts."""
        return AnswerObjective(self, backbone, cfg)


@dataclass(frozen=True, eq=False)
class Turn:
    """One assistant turn to learn: the conversation before it, the answer, the image."""

    messages: tuple[dict[str, Any], ...]  # chat-template messages before the answer
    answer: str
    image: Path | None
    n_images: int


class AnswerObjective:
    """Mean cross-entropy of the answer tokens (+ EOS) given the conversation before them."""

    def __init__(self, method: M2PT, backbone: LlavaBackbone, cfg: M2PTConfig) -> None:
        self.method, self.bb, self.n_visual = method, backbone, cfg.n_visual
        self._ids: dict[int, tuple[list[int], list[int]]] = {}  # turn -> (context, answer) ids

    def ids(self, turn: Turn) -> tuple[list[int], list[int]]:
        """Token ids of the context (each image taking its positions under this config's visual
        prompts, as when served) and of the answer; encoded once per turn."""
        if (cached := self._ids.get(id(turn))) is None:
            prompt = self.bb.encode_chat(list(turn.messages), turn.n_images, self.n_visual)
            answer = self.bb.tokenizer(" " + turn.answer, add_special_tokens=False)["input_ids"]
            cached = self._ids[id(turn)] = (prompt, [*answer, *sorted(self.bb.eos_ids)[:1]])
        return cached

    def step(self, params: dict[str, Tensor], batch: Sequence[Turn]) -> Step:
        """Loss (differentiable in the params) and answer-token hits of one batch."""
        encoded = [self.ids(t) for t in batch]
        rows = [prompt + answer for prompt, answer in encoded]
        images = [Image.open(t.image).convert("RGB") for t in batch if t.image is not None]
        pixels = self.bb.pixel_values(images) if images else None
        prompts = self.method.prompts(params, len(batch), self.bb.dtype)
        # Rows with no image take no visual prompt row: embed() keeps the rows with images only.
        logits, _ = self.bb.forward(rows, pixels, prompts, all_logits=True)
        width = logits.shape[1]
        labels = torch.full((len(batch), width), -100, dtype=torch.long, device=logits.device)
        for b, (_, answer) in enumerate(encoded):
            labels[b, width - len(answer) :] = torch.tensor(answer, device=logits.device)
        predicted, target = logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten()
        answered = target != -100
        hits = float((predicted.argmax(-1)[answered] == target[answered]).sum())
        return Step(F.cross_entropy(predicted, target), hits, int(answered.sum()))
