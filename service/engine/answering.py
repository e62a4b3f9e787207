"""Requests -> generation: resolve the checkpoint, decode the image, build the prompt, detokenize.

What the `/v1/answer` and `/v1/chat/completions` routes share. Images come inline only (base64
or `data:` URIs, through the same bounded decoder as classification); a remote URL is refused
before anything else happens, never fetched.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from service import errors
from service.backbones.llava import LlavaBackbone
from service.engine.continuous import ContinuousEngine
from service.engine.gen_request import Event, Sampling
from service.engine.generation import GenerationEngine
from service.engine.residency import Residency
from service.images import ImageLimits, decode_base64, open_image
from service.prompts.m2pt import PLAIN_ANSWER_PLAN, AnswerPlan
from service.settings import Settings

PLAIN_MODELS = ("plain", "none", "")


@dataclass
class Prepared:
    """One request ready for the engine."""

    ids: list[int]
    pixels: Tensor | None
    plan: AnswerPlan
    checkpoint: str | None
    version: int | None


class Detokenizer:
    """Token ids -> text deltas whose concatenation is exactly the decode of all the ids.

    A delta is held back while the text so far ends in an incomplete UTF-8 sequence (byte-level
    tokenizers split characters across tokens), and released at `flush`.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.sent = tokenizer, ""
        self.ids: list[int] = []

    def text(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def push(self, ids: tuple[int, ...] | list[int]) -> str:
        self.ids.extend(ids)
        text = self.text()
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def flush(self) -> str:
        text = self.text()
        if not text.startswith(self.sent):  # cannot happen with byte-level BPE; never lose text
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


@dataclass
class Generation:
    """The serving pipeline for LLaVA, shared by the answer and chat routes."""

    backbone: LlavaBackbone
    residency: Residency
    engine: GenerationEngine | ContinuousEngine
    limits: ImageLimits
    timeout_s: float
    max_new_tokens: int
    status: dict[str, str] = field(default_factory=dict)  # what /readyz adds

    def deadline(self) -> float:
        return time.monotonic() + self.timeout_s

    def sampling(
        self, max_new_tokens: int | None, temperature: float, top_p: float, seed: int | None
    ) -> Sampling:
        n = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not 1 <= n <= self.max_new_tokens:
            raise errors.BadRequest(f"max_new_tokens must be within 1..{self.max_new_tokens}")
        if not 0 <= temperature <= 2 or not 0 < top_p <= 1:
            raise errors.BadRequest("temperature must be within 0..2 and top_p within (0, 1]")
        return Sampling(n, temperature, top_p, seed)

    async def plan(self, ref: str | None) -> tuple[AnswerPlan, str | None, int | None]:
        if ref is None or ref in PLAIN_MODELS or ref == self.backbone.model_name:
            return PLAIN_ANSWER_PLAN, None, None
        resident = await asyncio.to_thread(self.residency.resolve, ref)
        plan: Any = resident.plan
        if not isinstance(plan, AnswerPlan):
            raise errors.InvalidContent(
                f"checkpoint {ref!r} does not answer instructions (its method classifies)"
            )
        return plan, resident.name, resident.version

    def image(self, item: str) -> Tensor:
        """A base64 string or `data:` URI -> pixel values `[1, 3, H, W]` (worker thread)."""
        if item[:8].lower().startswith(("http://", "https://", "file:", "ftp:")):
            raise errors.BadRequest(
                "remote image URLs are not fetched; send the image inline as a data: URI "
                "(data:image/png;base64,...)"
            )
        image = open_image(decode_base64(item, self.limits), self.limits)
        return self.backbone.pixel_values([image]).cpu()

    async def prepare(
        self, ref: str | None, messages: list[dict[str, Any]], images: list[str]
    ) -> Prepared:
        """Resolve, decode and tokenize one request (at most one image: LLaVA-1.5's format)."""
        if len(images) > 1:
            raise errors.TooManyImages(f"{len(images)} images; this model takes at most 1")
        pixels = await asyncio.to_thread(self.image, images[0]) if images else None
        plan, name, version = await self.plan(ref)
        try:
            # the plan decides how many positions each image takes (visual prompts add some)
            # and the template: a checkpoint's own (the one it was trained with) by default
            ids = self.backbone.encode_chat(messages, len(images), plan.n_visual, plan.conversation)
        except errors.PromptServeError:
            raise
        except Exception as exc:  # a chat template refusing the roles' order, for one
            raise errors.BadRequest(f"cannot format the conversation: {exc}") from exc
        return Prepared(ids, pixels, plan, name, version)

    async def events(self, prep: Prepared, sampling: Sampling) -> AsyncIterator[Event]:
        async for event in self.engine.stream(
            prep.ids, prep.pixels, prep.plan, sampling, self.deadline()
        ):
            yield event

    async def complete(self, prep: Prepared, sampling: Sampling) -> tuple[str, str, int]:
        """Answer text, finish reason and completion tokens."""
        tokens, reason = await self.engine.complete(
            prep.ids, prep.pixels, prep.plan, sampling, self.deadline()
        )
        detok = Detokenizer(self.backbone.tokenizer)
        detok.push(tokens)
        return detok.text(), reason, len(tokens)


def user_message(instruction: str, with_image: bool) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": instruction})
    return [{"role": "user", "content": content}]


def make_engine(
    settings: Settings, backbone: LlavaBackbone, on_batch: Callable[[int], None] | None = None
) -> GenerationEngine | ContinuousEngine:
    """The generation engine `PROMPTSERVE_GENERATION` names (continuous unless asked)."""
    if settings.generation == "static":
        return GenerationEngine(
            backbone,
            max_batch_size=settings.gen_max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            on_batch=on_batch,
        )
    return ContinuousEngine(
        backbone,
        slots=settings.gen_max_batch_size,
        max_len=settings.gen_max_len or None,
        step_tokens=max(settings.gen_step_tokens, settings.gen_max_batch_size + 1),
        max_queue=settings.max_queue,
        on_batch=on_batch,
    )


@asynccontextmanager
async def start_generation(
    settings: Settings,
    backbone: LlavaBackbone,
    residency: Residency[AnswerPlan],
    on_batch: Callable[[int], None] | None = None,
) -> AsyncIterator[Generation]:
    """The answer path on a LLaVA backbone: the generation engine, warmed up."""
    engine = make_engine(settings, backbone, on_batch)
    await engine.start()
    try:
        generation = Generation(
            backbone=backbone,
            residency=residency,
            engine=engine,
            limits=ImageLimits.of(settings),
            timeout_s=settings.request_timeout_s,
            max_new_tokens=settings.max_new_tokens,
        )
        # one token through the whole path, so the first request does not pay for allocation
        ids = backbone.encode_chat(user_message("warm up", False), 0)
        await engine.complete(ids, None, PLAIN_ANSWER_PLAN, Sampling(max_new_tokens=1))
        yield generation
    finally:
        await engine.stop(settings.shutdown_timeout_s)
