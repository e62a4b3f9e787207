"""The engine half of classify and embed: references -> plans -> batched encodes -> results.

One image encode per distinct *vision identity* (plans without vision tokens or biases all see
the plain features, so any number of CoOp / zero-shot / dual-view checkpoints on one request
share one encode), then one matrix product and a top-k per checkpoint, in the batcher's worker
thread. What comes back is plain values (protocol.py): labels and scores, never a plan.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from service import errors
from service.backbones.clip import ClipBackbone, normalizer
from service.engine.batcher import Batcher
from service.engine.forward import encode, group
from service.engine.gpu_images import GpuImages, select_image_decode
from service.engine.protocol import (
    AdHoc,
    ClassifyResult,
    ClassifyWork,
    EmbedResult,
    EmbedWork,
    Images,
)
from service.engine.residency import Residency
from service.engine.runtimes.base import Runtime
from service.engine.runtimes.select import describe as describe_runtime
from service.engine.runtimes.select import select_runtime
from service.engine.zeroshot_cache import ZeroShotCache
from service.images import ImageLimits
from service.prompts.plans import Plan
from service.prompts.zeroshot import ZeroShot
from service.settings import Settings

log = logging.getLogger(__name__)

# A plan with no prompts: the plain backbone (its class matrix is never used for embeddings).
PLAIN_PLAN = Plan(labels=("",), logit_scale=1.0, classes=torch.zeros(1, 1))


@dataclass(frozen=True)
class Target:
    """One classifier a request asked for, resolved."""

    checkpoint: str | None
    version: int | None
    method: str
    plan: Plan


@dataclass
class Classifier:
    """Resolves, batches and encodes classify and embed work on a CLIP backbone."""

    backbone: ClipBackbone
    residency: Residency[Plan]
    batcher: Batcher
    zeroshot: ZeroShotCache
    limits: ImageLimits
    max_batch: int = 32  # the batcher's max_batch_size: larger requests go in chunks
    # PROMPTSERVE_IMAGE_DECODE: the front end sends bytes, decoded here on the device
    gpu_images: GpuImages | None = None
    status: dict[str, str] = field(default_factory=dict)  # runtime and image decode, /readyz

    async def classify(self, work: ClassifyWork) -> list[ClassifyResult]:
        """One result per target, one prediction list per image (softmax over its classes)."""
        targets = await self.targets(work.refs, work.adhoc, work.deadline)
        images = await self.images(work.images)
        groups = list(group([t.plan for t in targets], lambda p: p.vision_key).values())
        chunks = self._chunks(images)
        done = iter(
            await asyncio.gather(  # every group and chunk queued at once: they may share batches
                *(
                    self.batcher.submit(
                        chunk,
                        [targets[idx[0]].plan] * len(chunk),
                        _finisher([targets[i] for i in idx], work.top_k),
                        work.deadline,
                    )
                    for idx in groups
                    for chunk in chunks
                )
            )
        )
        out: list[ClassifyResult | None] = [None] * len(targets)
        for idx in groups:
            parts = [next(done) for _ in chunks]  # a request larger than a batch: stitch it
            for j, i in enumerate(idx):
                first = parts[0][j]
                rows = tuple(row for part in parts for row in part[j].predictions)
                out[i] = ClassifyResult(first.checkpoint, first.version, first.method, rows)
        return [r for r in out if r is not None]

    async def targets(
        self, refs: Sequence[str], adhoc: AdHoc | None, deadline: float | None = None
    ) -> list[Target]:
        """Checkpoint references, or ad-hoc class names -> resolved, resident targets."""
        if adhoc is not None:
            plan = await self.zeroshot.plan(adhoc.classnames, adhoc.templates, deadline)
            return [Target(None, None, ZeroShot.name, plan)]
        out = []
        for ref in dict.fromkeys(refs):  # a repeated name is served once
            resident = self.residency.resolve_hot(ref)
            if resident is None:
                resident = await asyncio.to_thread(self.residency.resolve, ref)
            out.append(
                Target(resident.name, resident.version, resident.manifest.method, resident.plan)
            )
        return out

    async def images(self, images: Images) -> Tensor:
        """The batch to encode: as sent, or the sent bytes decoded on the device."""
        if isinstance(images, Tensor):
            return images
        if self.gpu_images is None:
            raise errors.BadRequest("this engine takes preprocessed images, not encoded bytes")
        return await asyncio.to_thread(self.gpu_images.decode, images, self.limits)

    async def embed(self, work: EmbedWork) -> EmbedResult:
        """Normalized image embeddings (plain or under a checkpoint's vision prompts) and texts."""
        checkpoint = version = None
        plan = PLAIN_PLAN
        if work.ref is not None:
            resident = await asyncio.to_thread(self.residency.resolve, work.ref)
            checkpoint, version, plan = resident.name, resident.version, resident.plan
        feats = None
        if work.images is not None:
            images = await self.images(work.images)
            parts = await asyncio.gather(
                *(
                    self.batcher.submit(c, [plan] * len(c), _to_cpu, work.deadline)
                    for c in self._chunks(images)
                )
            )
            feats = torch.cat(parts)
        texts = await self.embed_texts(work.texts) if work.texts else None
        return EmbedResult(checkpoint, version, feats, texts)

    async def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """Normalized text embeddings (the texts checked by the front end)."""
        feats = await asyncio.to_thread(self.backbone.text_features, list(texts))
        return F.normalize(feats, dim=-1)

    def _chunks(self, images: Tensor) -> list[Tensor]:
        return [images[i : i + self.max_batch] for i in range(0, len(images), self.max_batch)]


def encode_batch(
    backbone: ClipBackbone,
    normalize: Callable[[Tensor], Tensor],
    images: Tensor,
    plans: Sequence[Plan],
    runtime: Runtime,
) -> Tensor:
    """The batcher's model call (on its worker thread). uint8 crops, which the engine process
    gets from the front ends' slots, are moved and normalized here, once per batch: per call on
    the event loop, each copy to the device queued behind the batch the GPU was running, so
    the loop waited on the device once per request."""
    if images.dtype == torch.uint8:
        if backbone.device.type == "cuda":
            images = images.pin_memory().to(backbone.device, non_blocking=True)
        images = normalize(images)
    return encode(backbone, images, plans, runtime=runtime)


def _to_cpu(feats: Tensor) -> Tensor:
    return feats.cpu()


def _finisher(targets: list[Target], top_k: int) -> Callable[[Tensor], list[ClassifyResult]]:
    """What the worker thread does with one encode's features: each target's top-k."""

    def finish(feats: Tensor) -> list[ClassifyResult]:
        return [predictions(t, feats, top_k) for t in targets]

    return finish


def predictions(target: Target, feats: Tensor, top_k: int) -> ClassifyResult:
    """Softmax over the target's classes, top-k per image (best first)."""
    probs = target.plan.logits(feats).softmax(dim=-1)
    scores, index = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    labels = target.plan.labels
    rows = tuple(
        tuple((labels[j], float(s)) for s, j in zip(row_s, row_i, strict=True))
        for row_s, row_i in zip(scores.tolist(), index.tolist(), strict=True)
    )
    return ClassifyResult(target.checkpoint, target.version, target.method, rows)


@asynccontextmanager
async def start_classifier(
    settings: Settings,
    backbone: ClipBackbone,
    residency: Residency[Plan],
    on_batch: Callable[[int], None] | None = None,
) -> AsyncIterator[Classifier]:
    """The classify/embed path on a CLIP backbone: runtime, batcher, zero-shot cache, warmed up."""
    runtime, reason = select_runtime(
        settings.runtime,
        backbone,
        cache_dir=settings.onnx_cache_dir,
        threads=settings.onnx_threads,
        int8=settings.onnx_int8,
        max_batch=settings.max_batch_size,
    )
    log.info("runtime %s: %s", runtime.name, reason)
    gpu_images, decode_reason = select_image_decode(settings.image_decode, backbone)
    log.info("image decode: %s", decode_reason)
    # CUDA graphs are captured (ONNX graphs exported/loaded) here, before /readyz says ready.
    await asyncio.to_thread(getattr(runtime, "warm_up", lambda: None))
    batcher = Batcher(
        functools.partial(
            encode_batch, backbone, normalizer(backbone.preprocess_config()), runtime=runtime
        ),
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        on_batch=on_batch,
    )
    await batcher.start()
    try:
        classifier = Classifier(
            backbone=backbone,
            residency=residency,
            batcher=batcher,
            zeroshot=ZeroShotCache(
                backbone,
                settings.zeroshot_cache_entries,
                settings.max_adhoc_classes,
                text_encoder=getattr(runtime, "encode_text_ids", None),
                max_texts=settings.max_adhoc_texts,
                run=batcher.run_on_worker,
            ),
            limits=ImageLimits.of(settings),
            max_batch=settings.max_batch_size,
            gpu_images=gpu_images,
            status={**describe_runtime(runtime, reason), "image_decode": decode_reason},
        )
        # one batch through the whole path, so the first request does not pay for allocation
        blank = torch.zeros(1, 3, *backbone.image_size)
        await batcher.submit(blank, [PLAIN_PLAN], _to_cpu, None)
        await asyncio.to_thread(backbone.text_features, ["warm up"])
        yield classifier
    finally:
        await batcher.stop()
