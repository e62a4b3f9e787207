"""What the image batcher and the generation engine share: a bounded FIFO of requests, one
collector task on the event loop that forms batches, and ONE worker thread that computes them
(the event loop never computes; one thread keeps the model's kernels from contending)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

R = TypeVar("R")


class QueueWorker(Generic[R]):
    """Lifecycle and bounds; subclasses add `submit`-like callers and `_collect`."""

    kind = "worker"  # names the task and the thread

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_ms >= 0")
        self._max_batch, self._max_queue = max_batch_size, max_queue
        self._max_wait = max_wait_ms / 1000.0
        self._on_batch = on_batch
        self._queue: deque[R] = deque()
        self._arrived = asyncio.Event()  # set on every enqueue and on stop: wakes the collector
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def queue_depth(self) -> int:
        """Requests waiting; the batch being formed or run is not counted."""
        return len(self._queue)

    async def start(self) -> None:
        """Start the collector task on the running loop and the worker thread."""
        if self._task is not None or self._closing:
            raise RuntimeError(f"a {type(self).__name__} is started once")
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"promptserve-{self.kind}"
        )
        self._task = asyncio.get_running_loop().create_task(self._collect(), name=self.kind)

    async def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, finish what is queued within `timeout` s (the rest is refused with
        `NotReady`), then stop. Safe to call more than once."""
        self._closing = True
        self._arrived.set()
        task = self._task
        # asyncio.wait (not wait_for) so that concurrent stop() calls all wait on the drain.
        if task is not None and not (await asyncio.wait({task}, timeout=timeout))[0]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._queue:
            self._refuse(self._queue.popleft())
        if self._executor is not None:
            # A batch abandoned at the timeout may still be running: don't block the loop on it.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def _collect(self) -> None:
        raise NotImplementedError

    def _refuse(self, request: R) -> None:
        """Answer a request that will not run (stopping) with `NotReady`."""
        raise NotImplementedError
