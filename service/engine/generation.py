"""The generation engine: concurrent requests share prefill and decode (static batching).

Requests wait in a bounded FIFO (full -> `Overloaded`, 429). One collector task takes the first
waiting request, adds every waiting request whose plan has the same signature (same prompt
shapes; different checkpoints may share a batch, their prompts are stacked per row) until the
batch is full or `max_wait_ms` has passed, and hands the batch to ONE worker thread: one
left-padded prefill, then decode steps from the KV cache until every row has stopped (EOS,
its own `max_new_tokens`, its deadline, or its caller leaving). Tokens go back to each caller
as they are made, so streaming costs nothing extra. A request arriving mid-batch waits for the
next batch: kept as `PROMPTSERVE_GENERATION=static`, the baseline engine/continuous.py is
measured against (bench/llava.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import torch

from service.backbones.llava import LlavaBackbone
from service.engine.gen_request import (
    Event,
    GenerationQueue,
    GenRequest,
    Sampling,
    alive,
    generator,
    sample,
)
from service.errors import DeadlineExceeded
from service.prompts.m2pt import batch_prompts

__all__ = ["Event", "GenerationEngine", "Sampling"]

log = logging.getLogger(__name__)


class GenerationEngine(GenerationQueue):
    """Batches generation requests onto one LLaVA in one dedicated worker thread."""

    kind = "gen"

    def __init__(
        self,
        backbone: LlavaBackbone,
        *,
        max_batch_size: int = 8,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(
            max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
            on_batch=on_batch,
        )  # fmt: skip
        self.backbone = backbone
        self.batches: list[int] = []  # sizes of recent batches (tests and benchmarks read it)

    @property
    def max_len(self) -> int:
        return self.backbone.max_positions

    # --- the collector (event loop) ---------------------------------------------------------
    async def _collect(self) -> None:
        while (batch := await self._gather()) is not None:
            if not batch:
                continue
            self.batches.append(len(batch))
            del self.batches[:-1000]
            if self._on_batch is not None:
                with contextlib.suppress(Exception):
                    self._on_batch(len(batch))
            assert self._executor is not None
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._generate, batch
                )
            except Exception as exc:  # the executor itself failed; _generate reports its own
                for r in batch:
                    r.send(Event(error=exc))

    async def _gather(self) -> list[GenRequest] | None:
        first = await self._take_first()
        if first is None:
            return None
        batch, signature = [first], first.plan.signature
        window_end = time.monotonic() + self._max_wait
        while len(batch) < self._max_batch:
            # Take every waiting request that can share this batch, skipping the others.
            for r in [r for r in self._queue if r.plan.signature == signature]:
                if len(batch) >= self._max_batch:
                    break
                self._queue.remove(r)
                if alive(r):
                    batch.append(r)
            remaining = window_end - time.monotonic()
            if len(batch) >= self._max_batch or remaining <= 0 or self._closing:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        return [r for r in batch if alive(r)]

    async def _take_first(self) -> GenRequest | None:
        while True:
            while self._queue:
                request = self._queue.popleft()
                if alive(request):
                    return request
            if self._closing:
                return None
            self._arrived.clear()
            await self._arrived.wait()

    # --- the worker thread -------------------------------------------------------------------
    def _generate(self, batch: list[GenRequest]) -> None:
        try:
            with torch.inference_mode():
                self._run(batch)
        except Exception as exc:  # the whole batch shares a model failure, as is
            log.exception("generation batch of %d failed", len(batch))
            for r in batch:
                r.send(Event(error=exc))

    def _run(self, batch: list[GenRequest]) -> None:
        bb = self.backbone
        prompts = batch_prompts([r.plan for r in batch], bb.dtype)
        with_image = [r.pixels for r in batch if r.pixels is not None]
        pixels = torch.cat(with_image).to(bb.device, bb.dtype) if with_image else None
        logits, state = bb.forward([r.ids for r in batch], pixels, prompts, use_cache=True)
        assert state is not None
        gens = [generator(r.sampling.seed) for r in batch]
        active = [True] * len(batch)
        while True:
            nxt = [sample(logits[i], r.sampling, gens[i]) for i, r in enumerate(batch)]
            now = time.monotonic()
            for i, r in enumerate(batch):
                if not active[i]:
                    continue
                if r.left:
                    active[i] = False
                elif r.deadline is not None and now >= r.deadline:
                    active[i] = False
                    r.send(Event(error=DeadlineExceeded("deadline passed while generating")))
                elif nxt[i] in bb.eos_ids:
                    active[i] = False
                    r.send(Event(finish_reason="stop"))
                else:
                    r.generated.append(nxt[i])
                    done = len(r.generated) >= r.sampling.max_new_tokens
                    active[i] = not done
                    r.send(Event((nxt[i],), "length" if done else None))
            if not any(active):
                return
            logits = bb.decode(state, torch.tensor(nxt, dtype=torch.long))
