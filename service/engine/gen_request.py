"""What both generation engines (static and continuous) share: a request, its sampling settings,
the events a caller receives, the checks made before a request is queued, and token sampling."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from service.backbones.llava import LlavaBackbone
from service.engine.queue_worker import QueueWorker
from service.errors import BadRequest, DeadlineExceeded, NotReady, Overloaded
from service.prompts.m2pt import AnswerPlan


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Event:
    """What a caller receives: new token ids, or the end (with why), or an error."""

    tokens: tuple[int, ...] = ()
    finish_reason: str | None = None  # "stop" | "length" once finished
    error: BaseException | None = None


@dataclass(eq=False)
class GenRequest:
    ids: list[int]
    pixels: Tensor | None  # [1, 3, H, W]
    plan: AnswerPlan
    sampling: Sampling
    deadline: float | None
    queue: asyncio.Queue[Event]
    loop: asyncio.AbstractEventLoop
    left: bool = False  # the caller stopped listening
    generated: list[int] = field(default_factory=list)

    @property
    def positions(self) -> int:
        """KV positions the request may fill: its prompt slots, its tokens, its answer."""
        return self.plan_text + len(self.ids) + self.sampling.max_new_tokens

    @property
    def plan_text(self) -> int:
        return 0 if self.plan.text is None else int(self.plan.text.shape[1])

    def send(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed: nobody listens
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def check_request(
    bb: LlavaBackbone,
    ids: list[int],
    pixels: Tensor | None,
    plan: AnswerPlan,
    sampling: Sampling,
    max_positions: int,
) -> None:
    """Refuse, before queueing, what would fail inside a batch (and fail every row with it)."""
    n_text = 0 if plan.text is None else int(plan.text.shape[1])
    if n_text + len(ids) + sampling.max_new_tokens > max_positions:
        raise BadRequest(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) "
            f"exceeds the {max_positions} positions a request may use"
        )
    per_image = bb.image_tokens(plan.n_visual)
    expected = 0 if pixels is None else int(pixels.shape[0]) * per_image
    if (found := ids.count(bb.image_token_id)) != expected:
        raise BadRequest(
            f"{found} image tokens for {expected // per_image} image(s) of {per_image} "
            f"positions under this plan (encode with its n_visual = {plan.n_visual})"
        )


def alive(request: GenRequest) -> bool:
    """False (and the caller told, if its deadline passed) when a request should not run."""
    if request.left:
        return False
    if request.deadline is not None and time.monotonic() >= request.deadline:
        request.send(Event(error=DeadlineExceeded("deadline passed while the request waited")))
        return False
    return True


def generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator().manual_seed(int(seed))


def sample(logits: Tensor, sampling: Sampling, gen: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise nucleus sampling (on the CPU: seeded generators)."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < sampling.top_p  # always keeps the first
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


async def collect(events: AsyncIterator[Event]) -> tuple[list[int], str]:
    """A stream's tokens (without the stop token) and its finish reason."""
    tokens: list[int] = []
    reason = "length"
    async for event in events:
        tokens.extend(event.tokens)
        reason = event.finish_reason or reason
    return tokens, reason


async def follow(request: GenRequest) -> AsyncIterator[Event]:
    """The events of a queued request until its last; its deadline is kept here too (a row
    stuck behind others never holds its caller past it). Leaving marks the request `left`:
    the engine frees its row at the next step."""
    try:
        while True:
            deadline = request.deadline
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                event = await asyncio.wait_for(request.queue.get(), timeout)
            except TimeoutError:
                raise DeadlineExceeded("deadline passed while generating") from None
            if event.error is not None:
                raise event.error
            yield event
            if event.finish_reason is not None:
                return
    finally:
        request.left = True


class GenerationQueue(QueueWorker[GenRequest]):
    """What the static and the continuous generation engines share: a request's checks at the
    door, its place in the queue, and its events as they are made. Each engine adds `_collect`
    and says how long a request may be (`max_len`) and what is busy when it refuses one."""

    backbone: LlavaBackbone
    busy = ""  # what is full besides the queue, for the 429 message

    @property
    def max_len(self) -> int:
        raise NotImplementedError

    def _refuse(self, request: GenRequest) -> None:
        request.send(Event(error=NotReady("shutting down")))

    async def stream(
        self,
        ids: list[int],
        pixels: Tensor | None,
        plan: AnswerPlan,
        sampling: Sampling,
        deadline: float | None = None,
    ) -> AsyncIterator[Event]:
        """Events for one request as they are made; the last has `finish_reason` or `error`.

        Raises before the first event: `Overloaded` (queue full), `DeadlineExceeded`,
        `NotReady`, `BadRequest` (longer than `max_len`, or image tokens not of this plan).
        """
        if self._closing or self._task is None:
            raise NotReady("shutting down" if self._closing else "generation engine not started")
        check_request(self.backbone, ids, pixels, plan, sampling, self.max_len)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline passed before the request was queued")
        if (depth := len(self._queue)) >= self._max_queue:
            raise Overloaded(
                f"server overloaded: {self.busy}{depth} requests queued; retry with backoff"
            )
        loop = asyncio.get_running_loop()
        request = GenRequest(ids, pixels, plan, sampling, deadline, asyncio.Queue(), loop)
        self._queue.append(request)
        self._arrived.set()
        try:
            async for event in follow(request):  # leaving marks it: the worker stops its row
                yield event
        finally:
            with contextlib.suppress(ValueError):
                self._queue.remove(request)
            self._arrived.set()  # a waiting collector notices the room at once

    async def complete(
        self,
        ids: list[int],
        pixels: Tensor | None,
        plan: AnswerPlan,
        sampling: Sampling,
        deadline: float | None = None,
    ) -> tuple[list[int], str]:
        """All generated tokens (without the stop token) and the finish reason."""
        return await collect(self.stream(ids, pixels, plan, sampling, deadline))
