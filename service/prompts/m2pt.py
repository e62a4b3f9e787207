"""M²PT: multimodal prompt tuning (Wang et al., EMNLP 2024, arXiv 2409.15657) on a frozen LLaVA.

Parameters, as the reference (William-wAng618/M2PT, `train_PT.py`) trains them: deep visual
prompts `[Lv, nv, d_vision]` (one set per vision layer, overwritten at each), deep textual
prompts `[Lt, nt, d_text]` (one set per decoder layer, written in prefill), with
`train_projector` the projector's own weights (`projector.<name>`: LLaVA v1's one Linear, the
reference's `tune_mm_mlp_adapter`), and with `train_head` its own output head (`head.weight`
`[vocab, d_text]`, the reference's `tune_lm_header`). Projector and head belong to the checkpoint:
its plan carries them, and rows of checkpoints with different ones share a batch (the backbone
groups rows by the tensors they use). `conversation` is the template it was trained with; the
answer routes format its requests with it. `dtype`: how its tensors are stored (imports of the
reference's bf16 runs keep bf16, exactly as trained; a 7B head is then 262 MB, not 524).

The defaults are the paper's prompt lengths (10 visual, 10 textual, every layer) with projector
and head frozen, the processor's chat template and float32, what our own training starts from.
A checkpoint names no classes (`classnames` is empty): it answers instructions instead.

Training (its objective below): every assistant turn of a conversation is one sample; the loss is
the token cross-entropy of the answer (plus the end-of-sequence token) given the conversation
before it, with only the declared tensors trained.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field
from torch import Tensor

from service.backbones.base import Capability
from service.backbones.conversation import Conversation
from service.backbones.llava import LlavaBackbone, Prompts
from service.errors import InvalidConfig
from service.prompts.method import MethodBase, MethodConfig, Step
from service.prompts.recipe import Recipe

PROJECTOR_PREFIX = "projector."
HEAD = "head.weight"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class M2PTOutput:
    """M²PT's importer hook: what the reference's `train_PT.py` output (the whole model's state
    dict in LLaVA v1 key names, read by service/importers/m2pt.py) holds of this method's
    parameters. Every other saved tensor is the base's, compared with the served one."""

    reference: ClassVar[str] = "William-wAng618/M2PT"
    # per-layer prompts `[1, n, d]`, the layer in group 1: the tower's encoder and the decoder's
    visual: re.Pattern[str] = re.compile(r"(?:^|\.)vision_model\.encoder\.prompts\.(\d+)$")
    text: re.Pattern[str] = re.compile(r"^(?:.*\.)?model\.prompts\.(\d+)$")
    # base tensors (served names) the reference trains: `lm_head` (re-created as a parameter;
    # `tune_lm_header`) and the projector (`tune_mm_mlp_adapter`): ours when they differ
    head: str = "lm_head.weight"
    projector: str = "model.multi_modal_projector."

    def is_prompt(self, key: str) -> bool:
        """A saved key that is one of the reference's prompts (no base tensor)."""
        return bool(self.visual.search(key) or self.text.match(key))

    def parameter(self, served: str, backbone: LlavaBackbone) -> str | None:
        """Our parameter for a base tensor the reference may train (None: a frozen one); only
        the projector tensors the served base carries (v1's one Linear: `linear_1`)."""
        if served == self.head:
            return HEAD
        rest = served.removeprefix(self.projector)
        if rest == served or rest not in backbone.projector_shapes():
            return None
        return PROJECTOR_PREFIX + rest


class M2PTConfig(MethodConfig):
    n_visual: int = Field(default=10, ge=0, le=256, description="visual prompt tokens per layer")
    n_text: int = Field(default=10, ge=0, le=256, description="textual prompt tokens per layer")
    visual_depth: int | None = Field(default=None, ge=1, le=256, description="None: all layers")
    text_depth: int | None = Field(default=None, ge=1, le=512, description="None: all layers")
    train_projector: bool = False
    train_head: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"
    conversation: Conversation | None = None


@dataclass(frozen=True)
class AnswerSignature:
    """Plans with equal signatures share one batch (per-sample prompts are stacked; projectors
    and heads are per row, so they do not split batches)."""

    visual: tuple[int, int] = (0, 0)
    text: tuple[int, int] = (0, 0)


@dataclass(eq=False)
class AnswerPlan:
    """An M²PT checkpoint's serving form (or the plain model's, with everything None)."""

    vision: Tensor | None = None  # [Lv, nv, d_vision]
    text: Tensor | None = None  # [Lt, nt, d_text]
    projector: dict[str, Tensor] | None = None  # the checkpoint's projector tensors (by name)
    head: Tensor | None = None  # its output head [vocab, d_text], in the backbone's dtype
    conversation: Conversation | None = None  # its template; None: the processor's
    labels: tuple[str, ...] = field(default=())

    @property
    def n_visual(self) -> int:
        """Visual prompts per layer: each image then fills `image_tokens(n_visual)` positions."""
        return 0 if self.vision is None else int(self.vision.shape[1])

    @property
    def signature(self) -> AnswerSignature:
        def dims(t: Tensor | None) -> tuple[int, int]:
            return (0, 0) if t is None else (int(t.shape[0]), int(t.shape[1]))

        return AnswerSignature(dims(self.vision), dims(self.text))

    def to(self, device: torch.device | str) -> AnswerPlan:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        proj = (
            None if self.projector is None else {k: v.to(device) for k, v in self.projector.items()}
        )
        return AnswerPlan(
            move(self.vision), move(self.text), proj, move(self.head), self.conversation,
            self.labels,
        )  # fmt: skip

    @property
    def nbytes(self) -> int:
        tensors = [self.vision, self.text, self.head, *(self.projector or {}).values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


PLAIN_ANSWER_PLAN = AnswerPlan()


def batch_prompts(plans: Sequence[AnswerPlan], dtype: torch.dtype) -> Prompts:
    """Stack the per-row prompts of plans that share one signature; each row keeps its plan's
    own projector and head (by reference: the backbone groups rows that share one)."""
    first = plans[0]
    if any(p.signature != first.signature for p in plans):
        raise ValueError("plans in one batch must share a signature")
    vision, text = _rows([p.vision for p in plans], dtype), _rows([p.text for p in plans], dtype)
    projectors = tuple(p.projector for p in plans)
    heads = tuple(p.head for p in plans)
    return Prompts(
        vision,
        text,
        projectors if any(p is not None for p in projectors) else (),
        heads if any(h is not None for h in heads) else (),
    )


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
        if cfg.train_head:
            out[HEAD] = backbone.head_shape
        return out

    def param_dtype(self, cfg: M2PTConfig) -> torch.dtype:
        """The dtype its checkpoint tensors are stored in (`dtype`)."""
        return DTYPES[cfg.dtype]

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
        """Prompts ~ N(0, 0.02); a trainable projector or head starts from the base's, as the
        reference's do (it loads the pretrained adapter and re-creates `lm_head` from Vicuna's)."""
        gen = torch.Generator().manual_seed(seed)
        params: dict[str, Tensor] = {}
        frozen = backbone.projector.state_dict()
        dtype = self.param_dtype(cfg)
        for key, shape in self.shapes(backbone, cfg).items():
            if key.startswith(PROJECTOR_PREFIX):
                start = frozen[key.removeprefix(PROJECTOR_PREFIX)]
            elif key == HEAD:
                start = backbone.model.lm_head.weight
            else:
                params[key] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
                continue
            params[key] = start.detach().to("cpu", dtype).clone()
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
        head = params.get(HEAD)
        return Prompts(
            expand(params.get("visual_prompts")),
            expand(params.get("text_prompts")),
            (proj,) * batch if proj else (),
            (head.to(dtype),) * batch if head is not None else (),
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
        def get(key: str, dtype: torch.dtype = torch.float32) -> Tensor | None:
            t = params.get(key)
            return None if t is None else t.detach().to(backbone.device, dtype)

        # projector and head in the backbone's dtype once, here: never cast per batch
        proj = {
            k.removeprefix(PROJECTOR_PREFIX): v.detach().to(backbone.device, backbone.dtype)
            for k, v in params.items()
            if k.startswith(PROJECTOR_PREFIX)
        }
        return AnswerPlan(
            get("visual_prompts"), get("text_prompts"), proj or None,
            get(HEAD, backbone.dtype), cfg.conversation,
        )  # fmt: skip

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
        self.conversation = cfg.conversation
        self._ids: dict[int, tuple[list[int], list[int]]] = {}  # turn -> (context, answer) ids

    def ids(self, turn: Turn) -> tuple[list[int], list[int]]:
        """Token ids of the context (each image taking its positions under this config's visual
        prompts, as when served) and of the answer; encoded once per turn."""
        if (cached := self._ids.get(id(turn))) is None:
            prompt = self.bb.encode_chat(
                list(turn.messages), turn.n_images, self.n_visual, self.conversation
            )
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
