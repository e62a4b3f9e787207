"""Dynamic batching in front of the model: concurrent requests share one encoder call.

Requests wait in a bounded FIFO. One collector task takes the first, adds whole requests while
the batch has room and `max_wait_ms` has not passed, and hands the batch to ONE worker thread
that runs the model, then each request's `finish`: the event loop never computes, it only moves
futures. The collector forms the next batch while the worker computes one (`IN_FLIGHT`), so
the worker goes from batch to batch without waiting for the loop to answer the last one's
callers and gather again: on a GPU host that wait is time the device sits idle.

 Batches mix checkpoints on purpose: `run` (`forward.encode`) groups samples by plan
signature itself, so splitting per checkpoint here would only cost encoder passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from service.engine.queue_worker import QueueWorker
from service.errors import BadRequest, DeadlineExceeded, NotReady, Overloaded, TooManyImages
from service.prompts.plans import Plan

log = logging.getLogger(__name__)

T = TypeVar("T")
Run = Callable[[torch.Tensor, list[Plan]], torch.Tensor]
Outcome = tuple[Any, BaseException | None]  # per request: (result, None) or (None, error)
IN_FLIGHT = 2  # batches handed to the worker thread at once: one computing, the next waiting


@dataclass(eq=False, repr=False)  # repr=False: the default would format the image tensors
class _Request:
    images: torch.Tensor
    n: int
    plans: list[Plan]
    finish: Callable[[torch.Tensor], Any]
    deadline: float | None  # time.monotonic() value
    future: asyncio.Future[Any]

    def __repr__(self) -> str:
        return f"_Request(n={self.n}, shape={tuple(self.images.shape)})"

    def joins(self, first: _Request) -> bool:
        # Requests are concatenated along the batch axis, so the rest of the shape, the dtype and
        # the device must agree; a mismatch closes the batch instead of failing all of it.
        a, b = self.images, first.images
        return a.shape[1:] == b.shape[1:] and a.dtype == b.dtype and a.device == b.device


@dataclass(eq=False)
class _Handed:
    """A batch given to the worker thread; `started` is set by the worker (a plain store)."""

    batch: list[_Request]
    started: bool = False


class Batcher(QueueWorker[_Request]):
    """Coalesces concurrent `submit`s into batched `run` calls on one dedicated worker thread."""

    kind = "batch"

    def __init__(
        self,
        run: Run,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(
            max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
            on_batch=on_batch,
        )  # fmt: skip
        self._run = run
        # Compute seconds per request at the batch sizes the traffic makes (moving average):
        # what a request admitted now costs the ones behind it (Inference.admission).
        self.seconds_per_request: float | None = None
        self._executing = 0  # batches handed to the worker and not yet answered
        self._handed: list[_Handed] = []
        self._idle = asyncio.Event()  # set when nothing is queued or computing

    @property
    def queue_depth(self) -> int:
        """Requests waiting: queued, or in a batch handed to the worker and not started."""
        waiting = (r for h in self._handed if not h.started for r in h.batch)
        return len(self._queue) + sum(1 for r in waiting if not r.future.done())

    def _refuse(self, request: _Request) -> None:
        _settle(request.future, None, NotReady("shutting down"))

    async def submit(
        self,
        images: torch.Tensor,
        plans: Sequence[Plan],
        finish: Callable[[torch.Tensor], T],
        deadline: float | None = None,
    ) -> T:
        """`finish(features of these images [n, e])`, computed in a shared batch.

        Raises `TooManyImages` (n > max_batch_size), `Overloaded` (queue full, at once),
        `DeadlineExceeded` (at `deadline`, a `time.monotonic()` value), `NotReady` (stopping),
        and whatever `run` or `finish` raised, as is.
        """
        if self._closing or self._task is None:
            raise NotReady("shutting down" if self._closing else "batcher not started")
        if images.ndim != 4 or images.shape[0] != len(plans):
            raise ValueError("images must be [n, C, H, W] with one plan per image")
        if (n := int(images.shape[0])) == 0:
            raise BadRequest("no images in the request")
        if n > self._max_batch:
            raise TooManyImages(f"{n} images in one request; at most {self._max_batch}")
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline passed before the request was queued")
        if (depth := self.queue_depth) >= self._max_queue:
            # Fail fast: a 429 the client can back off from beats a queue that only grows.
            raise Overloaded(f"server overloaded: {depth} requests queued; retry with backoff")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        request = _Request(images, n, list(plans), finish, deadline, future)
        self._queue.append(request)
        self._arrived.set()
        timeout = None if deadline is None else deadline - time.monotonic()
        try:
            # On timeout or caller cancellation, wait_for cancels `future`: the collector and the
            # worker skip cancelled requests, so nobody computes for a caller who has left.
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            if future.cancelled():
                raise DeadlineExceeded("deadline passed while the request waited") from None
            raise  # a TimeoutError raised by run or finish themselves
        finally:
            # Still queued only if the caller gave up (deadline, cancel); a served request was
            # taken by the collector. deque.remove of a missing item also formats it into its
            # error message, which for image tensors cost a third of the CPU under load.
            if not future.done() or future.cancelled():
                with contextlib.suppress(ValueError):
                    self._queue.remove(request)

    async def run_on_worker(self, fn: Callable[[], T], patience_s: float = 0.1) -> T:
        """Run `fn` (other model work: ad-hoc text encoding) on the model's one worker thread,
        so it never contends with the encoder for the cores; after the queued image batches,
        or after `patience_s` if they keep coming (background work still progresses)."""
        if self._closing or self._executor is None:
            raise NotReady("shutting down" if self._closing else "batcher not started")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wait_idle(), patience_s)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _wait_idle(self) -> None:
        while self._queue or self._executing:
            self._idle.clear()
            await self._idle.wait()

    async def _collect(self) -> None:
        room = asyncio.Semaphore(IN_FLIGHT)
        running: set[asyncio.Task[None]] = set()

        def done(task: asyncio.Task[None]) -> None:
            running.discard(task)
            room.release()

        try:
            while True:
                await room.acquire()
                batch = await self._gather()
                if not batch:
                    room.release()
                    if batch is None:
                        break
                    continue
                task = asyncio.get_running_loop().create_task(self._execute(batch))
                running.add(task)
                task.add_done_callback(done)
            await asyncio.gather(*running)
        finally:  # cancelled by stop(): the batches in flight answer NotReady
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _gather(self) -> list[_Request] | None:
        """The next batch (possibly empty if all of it expired); None once stopping and drained."""
        first = await self._take_first()
        if first is None:
            return None
        batch, size = [first], first.n
        window_end = time.monotonic() + self._max_wait
        while size < self._max_batch:
            if not self._queue:
                remaining = window_end - time.monotonic()
                if remaining <= 0 or self._closing:  # when stopping nothing more will arrive
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
                continue
            head = self._queue[0]
            if not _alive(head):
                self._queue.popleft()
                continue
            # FIFO, requests never split: a head that does not fit closes the batch.
            if size + head.n > self._max_batch or not head.joins(first):
                break
            batch.append(self._queue.popleft())
            size += head.n
        # Callers may have left or run out of time during the window: don't compute for them.
        return [r for r in batch if _alive(r)]

    async def _take_first(self) -> _Request | None:
        while True:
            while self._queue:
                request = self._queue.popleft()
                if _alive(request):
                    return request
            if self._closing:
                return None
            self._arrived.clear()
            await self._arrived.wait()

    async def _execute(self, batch: list[_Request]) -> None:
        self._executing += 1
        try:
            await self._execute_batch(batch)
        finally:
            self._executing -= 1
            if not self._queue and not self._executing:
                self._idle.set()

    async def _execute_batch(self, batch: list[_Request]) -> None:
        if self._on_batch is not None:
            try:
                self._on_batch(sum(r.n for r in batch))
            except Exception:  # metrics must never take serving down
                log.exception("on_batch callback failed")
        try:
            loop = asyncio.get_running_loop()
            handed = _Handed(batch)
            self._handed.append(handed)
            try:
                outcomes, seconds = await loop.run_in_executor(self._executor, self._timed, handed)
            finally:
                self._handed.remove(handed)
            per = seconds / len(batch)
            last = self.seconds_per_request
            self.seconds_per_request = per if last is None else 0.8 * last + 0.2 * per
        except asyncio.CancelledError:  # stop() gave up waiting: answer rather than hang
            for r in batch:
                _settle(r.future, None, NotReady("shutting down"))
            raise
        except Exception as exc:  # the executor itself failed; _compute catches model errors
            outcomes = [(None, exc)] * len(batch)
        for r, (result, error) in zip(batch, outcomes, strict=True):
            _settle(r.future, result, error)

    def _timed(self, handed: _Handed) -> tuple[list[Outcome], float]:
        """`_compute` on the worker, and its seconds (not the wait behind the batch before).
        Callers who left while the batch waited for the worker (deadline, disconnect) are
        dropped here, as the collector drops them from the queue: nobody computes for them.
        Reading done() off the loop is a benign race: at worst one request runs in vain."""
        handed.started = True
        started = time.monotonic()
        live = [r for r in handed.batch if not r.future.done()]
        computed = iter(self._compute(live) if live else [])
        outcomes = [next(computed) if r in live else (None, None) for r in handed.batch]
        return outcomes, time.monotonic() - started

    def _compute(self, batch: list[_Request]) -> list[Outcome]:
        """One `run` for the whole batch, then each request's `finish` (worker thread only)."""
        try:
            images = batch[0].images if len(batch) == 1 else torch.cat([r.images for r in batch])
            features = self._run(images, [p for r in batch for p in r.plans])
            if features.shape[0] != images.shape[0]:
                raise RuntimeError(f"run returned {features.shape[0]} rows for {len(images)}")
        except Exception as exc:  # the whole batch shares the failure, as is
            return [(None, exc)] * len(batch)
        outcomes: list[Outcome] = []
        offset = 0
        for r in batch:
            part, offset = features[offset : offset + r.n], offset + r.n
            try:
                # Skip callers who left meanwhile (the same benign race as in _timed).
                outcomes.append((None if r.future.done() else r.finish(part), None))
            except Exception as exc:  # one request's post-processing fails only that request
                outcomes.append((None, exc))
        return outcomes


def _alive(request: _Request) -> bool:
    """False for a request nobody waits for any more; an expired one is told so."""
    if request.future.done():
        return False
    if request.deadline is not None and time.monotonic() >= request.deadline:
        request.future.set_exception(DeadlineExceeded("deadline passed while the request waited"))
        return False
    return True


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled or timed out meanwhile
        pass
    elif error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
