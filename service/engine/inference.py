"""Requests -> batched model work: resolve checkpoints, decode images, submit, format results.

One image encode per distinct *vision identity* (plans without vision tokens or biases all see
the plain features, so any number of CoOp / zero-shot / dual-view checkpoints on one request
share one encode), then one matrix product per checkpoint, in the batcher's worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from service import errors
from service.backbones.clip import ClipBackbone
from service.engine.batcher import Batcher
from service.engine.gpu_images import GpuImages
from service.engine.residency import Residency
from service.engine.zeroshot_cache import ZeroShotCache
from service.images import (
    ImageLimits,
    PixelBudget,
    decode_base64,
    decode_batch,
    request_pixels,
)
from service.prompts.base import Plan


@dataclass(frozen=True)
class Target:
    """One classifier a request asked for."""

    checkpoint: str | None
    version: int | None
    method: str
    plan: Plan


def vision_key(plan: Plan) -> object:
    """Plans with no vision tokens and no biases produce identical image features."""
    if plan.vision_tokens is None and plan.vision_bias is None:
        return "plain"
    return id(plan)


@dataclass
class Inference:
    """The serving pipeline shared by the HTTP routes."""

    backbone: ClipBackbone
    residency: Residency
    batcher: Batcher
    zeroshot: ZeroShotCache
    limits: ImageLimits
    max_images: int
    timeout_s: float
    max_batch: int = 32  # the batcher's max_batch_size: larger requests go in chunks
    # Admission: requests between arrival and answer (reading, decoding, queued, computing).
    # Bounded so a crowd is refused at once, before its bodies are parsed and its images
    # decoded; the batcher's own queue bound alone came too late (decoding waits in the thread
    # pool), which made 429s take seconds under overload (bench/load.py). 0: unbounded.
    max_admitted: int = 0
    admitted: int = 0
    # ... and by time: refused when the work already admitted would take longer than this to
    # compute (admitted x the batcher's measured seconds per request), so accepted requests
    # wait about this long at most whatever the model's speed. 0: off.
    max_queue_wait_s: float = 0.0
    # Decoded pixels: per request (413 beyond) and in flight in the process (429 beyond).
    max_request_pixels: int = 100_000_000
    pixels: PixelBudget | None = None
    # PROMPTSERVE_IMAGE_DECODE: decode and preprocess on the backbone's device (None: on the CPU).
    gpu_images: GpuImages | None = None
    # PROMPTSERVE_JPEG_DRAFT: JPEGs decoded at the DCT scale that still covers this many pixels
    draft: int | None = None

    def deadline(self) -> float:
        """The deadline of a request arriving now: everything it costs counts against it."""
        return time.monotonic() + self.timeout_s

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Count a request in for its lifetime, or refuse it at once with 429 (event loop only)."""
        if self.max_admitted and self.admitted >= self.max_admitted:
            raise errors.Overloaded(
                f"server overloaded: {self.admitted} requests in progress; retry with backoff"
            )
        per = self.batcher.seconds_per_request
        if self.max_queue_wait_s and per and self.admitted * per > self.max_queue_wait_s:
            raise errors.Overloaded(
                f"server overloaded: about {self.admitted * per:.1f} s of work ahead "
                f"({self.admitted} requests); retry with backoff"
            )
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    # --- inputs --------------------------------------------------------------------------------
    def check_count(self, n: int) -> None:
        if n == 0:
            raise errors.BadRequest("no images in the request; send at least one")
        if n > self.max_images:
            raise errors.TooManyImages(
                f"{n} images in one request; at most {self.max_images} (split the request)"
            )

    def decode(self, items: Sequence[str | bytes]) -> Tensor:
        """Base64 strings or raw bytes -> preprocessed batch (run in a worker thread)."""
        self.check_count(len(items))
        blobs = [decode_base64(i, self.limits) if isinstance(i, str) else i for i in items]
        if self.gpu_images is not None:
            # device memory is bounded by the GPU path's own chunks; the request's total here
            request_pixels(blobs, self.limits, self.max_request_pixels)
            return self.gpu_images.decode(blobs, self.limits)
        return decode_batch(
            blobs,
            self.limits,
            self.backbone.preprocess,
            max_request_pixels=self.max_request_pixels,
            budget=self.pixels,
            draft=self.draft,
        )

    async def targets(
        self,
        checkpoint: str | None,
        checkpoints: Sequence[str] | None,
        classnames: Sequence[str] | None,
        templates: Sequence[str] | None,
        deadline: float | None = None,
    ) -> list[Target]:
        """Exactly one way of naming classifiers -> resolved, resident targets."""
        given = [x is not None for x in (checkpoint, checkpoints, classnames)]
        if sum(given) != 1:
            raise errors.BadRequest("give exactly one of checkpoint, checkpoints, classnames")
        if classnames is not None:
            plan = await self.zeroshot.plan(classnames, templates, deadline)
            return [Target(None, None, "zeroshot", plan)]
        if templates is not None:
            raise errors.BadRequest("templates go with classnames (ad-hoc zero-shot) only")
        refs = [checkpoint] if checkpoint is not None else list(checkpoints or [])
        if not refs:
            raise errors.BadRequest("checkpoints is empty; name at least one")
        out = []
        for ref in dict.fromkeys(refs):  # a repeated name is served once
            resident = await asyncio.to_thread(self.residency.resolve, ref)
            out.append(
                Target(resident.name, resident.version, resident.manifest.method, resident.plan)
            )
        return out

    # --- work ----------------------------------------------------------------------------------
    async def classify(
        self,
        items: Sequence[str | bytes],
        targets: list[Target],
        top_k: int,
        deadline: float | None = None,
    ) -> list[dict[str, Any]]:
        """One result per target, one prediction list per image (softmax over its classes)."""
        deadline = deadline if deadline is not None else self.deadline()
        images = await asyncio.to_thread(self.decode, items)
        groups: dict[object, list[Target]] = {}
        for t in targets:
            groups.setdefault(vision_key(t.plan), []).append(t)

        def finisher(group: list[Target]) -> Callable[[Tensor], list[dict[str, Any]]]:
            def finish(feats: Tensor) -> list[dict[str, Any]]:
                return [self._predictions(t, feats, top_k) for t in group]

            return finish

        chunks = self._chunks(images)
        jobs = [
            self.batcher.submit(chunk, [g[0].plan] * len(chunk), finisher(g), deadline)
            for g in groups.values()
            for chunk in chunks
        ]
        done = iter(await asyncio.gather(*jobs))
        by_target: dict[int, dict[str, Any]] = {}
        for g in groups.values():
            for _ in chunks:  # a request larger than a batch came back in pieces: stitch them
                for t, r in zip(g, next(done), strict=True):
                    if id(t) in by_target:
                        by_target[id(t)]["predictions"].extend(r["predictions"])
                    else:
                        by_target[id(t)] = r
        return [by_target[id(t)] for t in targets]

    def _chunks(self, images: Tensor) -> list[Tensor]:
        return [images[i : i + self.max_batch] for i in range(0, len(images), self.max_batch)]

    @staticmethod
    def _predictions(target: Target, feats: Tensor, top_k: int) -> dict[str, Any]:
        probs = target.plan.logits(feats).softmax(dim=-1)
        k = min(top_k, probs.shape[-1])
        scores, index = probs.topk(k, dim=-1)
        labels = target.plan.labels
        preds = [
            [{"label": labels[j], "score": float(s)} for s, j in zip(row_s, row_i, strict=True)]
            for row_s, row_i in zip(scores.tolist(), index.tolist(), strict=True)
        ]
        return {
            "checkpoint": target.checkpoint,
            "version": target.version,
            "method": target.method,
            "predictions": preds,
        }

    async def embed_images(self, items: Sequence[str | bytes], plan: Plan | None) -> Tensor:
        """Normalized image embeddings, plain or under a plan's vision prompts (batched)."""
        deadline = self.deadline()
        images = await asyncio.to_thread(self.decode, items)
        parts = await asyncio.gather(
            *(
                self.batcher.submit(c, [plan or PLAIN_PLAN] * len(c), lambda f: f.cpu(), deadline)
                for c in self._chunks(images)
            )
        )
        return torch.cat(parts)

    async def embed_texts(self, texts: Sequence[str]) -> Tensor:
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip() or len(t) > 1000:
                raise errors.BadRequest(f"text #{i} must be a non-empty string of <= 1000 chars")
        feats = await asyncio.to_thread(self.backbone.text_features, list(texts))
        return F.normalize(feats, dim=-1)


# A plan with no prompts: the plain backbone (its class matrix is never used for embeddings).
PLAIN_PLAN = Plan(labels=("",), logit_scale=1.0, classes=torch.zeros(1, 1))
