"""The continuous (iteration-level) generation engine: requests join and leave a running batch
at every step, each row under its own M²PT plan (the plain model is a plan too).

Why not transformers' own `transformers.generation.continuous_batching` (checked in 5.25): its
requests are token ids only (`add_request(input_ids)`; its model runner feeds `input_ids`), so
there is no place for LLaVA's image features (`inputs_embeds`), for M²PT's deep prompts written
at every decoder layer and vision layer, nor for a different plan per row; and it switches the
model's attention implementation to its paged kernels, which the static path shares. vLLM and
TGI schedule the same way but cannot hook every layer either. So the scheduling ideas are
vLLM V1's (engine/scheduler.py), the KV memory is a pool of slots (engine/kv_slots.py), the
running batch is engine/slot_batch.py, and this module is the loop around them.

The loop: requests wait in a bounded FIFO (full -> `Overloaded`, 429 with Retry-After). One
collector task on the event loop plans each step (which prefill chunks, which waiting requests
get a free slot) and hands it to ONE worker thread, which runs the prefill chunks and then one
decode step for every running row, sending each new token to its caller as it is made. Planning
happens while the worker is idle, so the batch's state is never touched by two threads at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

import torch

from service.backbones.llava import LlavaBackbone
from service.backbones.llava_steps import check_attention
from service.engine.gen_request import (
    Event,
    GenerationQueue,
    GenRequest,
    alive,
)
from service.engine.scheduler import Waiting, plan_step
from service.engine.slot_batch import Row, SlotBatch

log = logging.getLogger(__name__)


class ContinuousEngine(GenerationQueue):
    """Continuous batching of generation requests onto one LLaVA, in one worker thread."""

    kind = "gen"
    busy = "every KV slot busy and "

    def __init__(
        self,
        backbone: LlavaBackbone,
        *,
        slots: int = 8,
        max_len: int | None = None,
        step_tokens: int = 512,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(
            max_batch_size=slots, max_wait_ms=0, max_queue=max_queue, on_batch=on_batch
        )
        check_attention(backbone)
        if step_tokens <= slots:
            raise ValueError(f"step_tokens ({step_tokens}) must exceed the slots ({slots})")
        self.backbone, self.step_tokens = backbone, step_tokens
        length = min(max_len or backbone.max_positions, backbone.max_positions)
        self.batch = SlotBatch(backbone, slots, length)
        self.steps = 0  # steps run (tests wait on it)
        self.batches: list[int] = []  # rows decoded per recent step (tests and benchmarks)
        log.info(
            "continuous generation: %d KV slots x %d positions = %.1f MiB of KV cache, %d "
            "tokens per step", slots, length, self.batch.cache.nbytes / 2**20, step_tokens,
        )  # fmt: skip

    @property
    def max_len(self) -> int:
        return self.batch.max_len  # a KV slot's positions

    # --- the collector (event loop) ---------------------------------------------------------
    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self._queue and not alive(self._queue[0]):
                self._queue.popleft()
            if not self._queue and self.batch.idle:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            continued, admitted = plan_next(self.batch, self._queue, self.step_tokens)
            assert self._executor is not None
            try:
                decoded = await loop.run_in_executor(
                    self._executor, self._step, continued, admitted
                )
            except Exception as exc:  # the executor itself failed; _step reports its own
                for request, _ in admitted:
                    request.send(Event(error=exc))
                continue
            self.steps += 1
            if decoded:
                self.batches.append(decoded)
                del self.batches[:-1000]
                if self._on_batch is not None:
                    with contextlib.suppress(Exception):
                        self._on_batch(decoded)

    # --- the worker thread -------------------------------------------------------------------
    def _step(
        self, continued: list[tuple[Row, int]], admitted: list[tuple[GenRequest, int]]
    ) -> int:
        try:
            with torch.inference_mode():
                return self.batch.step(continued, admitted)
        except Exception as exc:  # a model failure: every row in the batch shares it, as is
            log.exception("generation step failed")
            self.batch.fail(exc)
            for request, _ in admitted:
                request.send(Event(error=exc))
            return 0


def plan_next(
    batch: SlotBatch, queue: deque[GenRequest], step_tokens: int
) -> tuple[list[tuple[Row, int]], list[tuple[GenRequest, int]]]:
    """The next step's prefill chunks (per prefilling row) and admissions (taken off `queue`),
    by engine/scheduler.py's policy. Called while no step runs: the batch's state is stable."""
    waiting = [
        Waiting(r.plan_text + len(r.ids), min(r.plan_text + 1, r.plan_text + len(r.ids)))
        for r in list(queue)[: batch.free_slots]
    ]
    prefilling = list(batch.prefilling)
    plan = plan_step(
        batch.n, [r.remaining for r in prefilling], waiting, batch.free_slots, step_tokens
    )
    admitted = [(queue.popleft(), take) for take in plan.admitted]
    return list(zip(prefilling, plan.continued, strict=True)), admitted
