"""`start_engine`: the serving parts a backbone's capabilities call for, as one `Engine`.

The engine holds the backbone, residency (the store's versions, validated and materialized, hot
swapped), and one path per capability: `classify`/`embed` (runtime, batcher, zero-shot cache:
classifier.py) and `answer` (the generation engine: answering.py). `Engine` is also the
in-process `EngineClient` (protocol.py): the routes call it directly, through the same narrow
interface a front end in another process will use.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import prompts_store as ps
from service import errors
from service.backbones.base import Backbone, Capability
from service.backbones.clip import ClipBackbone
from service.backbones.llava import LlavaBackbone
from service.checkpoints.publish import Published, publish
from service.engine.answering import Generation, start_generation
from service.engine.classifier import Classifier, start_classifier
from service.engine.protocol import (
    ClassifyResult,
    ClassifyWork,
    EmbedResult,
    EmbedWork,
    ImageInput,
    Load,
)
from service.engine.residency import Residency
from service.prompts.m2pt import AnswerPlan
from service.prompts.plans import Plan
from service.settings import Settings


@dataclass
class Engine:
    """The parts one backbone's capabilities call for (the in-process `EngineClient`)."""

    backbone: Backbone
    store: ps.PromptStore
    residency: Residency[Any]
    max_checkpoint_bytes: int
    classifier: Classifier | None = None
    generation: Generation | None = None

    @property
    def capabilities(self) -> frozenset[Capability]:
        return self.backbone.capabilities

    def describe(self) -> dict[str, str]:
        parts = [p.status for p in (self.classifier, self.generation) if p is not None]
        return {k: v for d in (self.backbone.describe(), *parts) for k, v in d.items()}

    def image_input(self) -> ImageInput:
        c = self._classifier()
        preprocess = None if c.gpu_images is not None else c.backbone.preprocess
        return ImageInput(preprocess, c.backbone.image_size[0])

    def load(self) -> Load:
        if self.classifier is not None:
            b = self.classifier.batcher
            return Load(b.queue_depth, b.seconds_per_request)
        if self.generation is not None:
            return Load(self.generation.engine.queue_depth, None)
        return Load(0, None)

    @property
    def ready(self) -> bool:
        return True  # in process: the engine exists only while it is ready

    def health(self) -> dict[str, Any]:
        return self.residency.health()

    def stats(self) -> dict[str, float]:
        health = self.health()
        counts = vars(self.residency.stats).items()
        return {
            **{name: float(v) for name, v in counts if isinstance(v, int)},
            "resident": float(health["resident"]),
            "store_up": 1.0 if health["store"] == "ok" else 0.0,
            "queue_depth": float(self.load().queue_depth),
        }

    async def residents(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.residency.residents)

    async def classify(self, work: ClassifyWork) -> list[ClassifyResult]:
        return await self._classifier().classify(work)

    async def embed(self, work: EmbedWork) -> EmbedResult:
        return await self._classifier().embed(work)

    async def publish(self, data: bytes, activate: bool) -> Published:
        return await asyncio.to_thread(
            publish,
            self.store,
            self.backbone,
            data,
            activate=activate,
            max_bytes=self.max_checkpoint_bytes,
        )

    async def labels(self, ref: str) -> tuple[str, ...]:
        resident = await asyncio.to_thread(self.residency.resolve, ref)
        return tuple(resident.plan.labels)

    def forget(self, name: str) -> None:
        self.residency.forget(name)

    def _classifier(self) -> Classifier:
        if self.classifier is None:  # the routes check capabilities first: say it anyway
            raise errors.WrongBackbone(f"a {self.backbone.title} backbone does not classify")
        return self.classifier


@asynccontextmanager
async def start_engine(
    settings: Settings,
    backbone: Backbone,
    store: ps.PromptStore,
    on_batch: Callable[[int], None] | None = None,
) -> AsyncIterator[Engine]:
    """Residency and the capabilities' paths, started and warmed up; stopped on exit."""
    caps = backbone.capabilities
    # the plan type the served methods materialize into (validation refuses the others first)
    plans: type[Plan] | type[AnswerPlan] = Plan if "classify" in caps else AnswerPlan
    residency: Residency[Any] = Residency(
        store,
        backbone,
        plans,
        device_budget=settings.device_budget_mib * 2**20,
        host_budget=settings.host_budget_mib * 2**20,
        max_checkpoint_bytes=settings.max_checkpoint_bytes,
    )
    residency.start()
    engine = Engine(backbone, store, residency, settings.max_checkpoint_bytes)
    async with AsyncExitStack() as parts:
        parts.callback(residency.close)
        # A backbone declaring a capability implements that path's interface (the casts say so).
        if "classify" in caps:
            clip = cast(ClipBackbone, backbone)
            path = start_classifier(settings, clip, residency, on_batch)
            engine.classifier = await parts.enter_async_context(path)
        if "answer" in caps:
            llava = cast(LlavaBackbone, backbone)
            gen = start_generation(settings, llava, residency, on_batch)
            engine.generation = await parts.enter_async_context(gen)
        yield engine
