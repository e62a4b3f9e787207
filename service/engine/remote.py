"""`RemoteEngine`: the `EngineClient` of a front-end process, talking to the engine process.

What crosses (engine/ipc.py: ZeroMQ frames, msgpack bodies): the small values of protocol.py.
Preprocessed images go through the front end's shared-memory slots (engine/shm.py): the call
names the segment and the slot numbers. A slot is given back only when the engine has answered
the call that named it (or is known dead), even when the caller stopped waiting: the engine
reads the slots when the call arrives, and a slot reused before that would feed it another
request's image.

Knowing the engine is alive: the control block names its pid and generation. The front end
watches the pid through a pidfd (readable the moment the process exits, zombie or not), so an
engine that dies fails every call in flight with 503 at once and the front end reports not
ready; when the supervisor's new engine is ready (a new generation), the front end connects
to it afresh (a new socket: nothing queued for the dead engine reaches the new one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import msgspec
import numpy as np
import torch
from torch import Tensor

from service import errors
from service.backbones.base import Capability
from service.backbones.clip import transform_of
from service.checkpoints.publish import Published
from service.engine.control import ControlBlock
from service.engine.ipc import EngineConnection
from service.engine.protocol import (
    ClassifyResult,
    ClassifyWork,
    EmbedResult,
    EmbedWork,
    ImageInput,
    Images,
    Load,
)
from service.engine.shm import SlotPool

log = logging.getLogger(__name__)

ENGINE_GONE = "the engine stopped; the service restarts it: retry shortly"
STATUS_EVERY_S = 0.5  # how old /readyz and /metrics' view of the engine may be
WATCH_EVERY_S = 0.05  # how soon a new engine generation is noticed


def tensor_blob(t: Tensor) -> tuple[list[int], bytes]:
    """A float32 CPU tensor as (shape, raw bytes) for a call's blobs."""
    t = t.detach().to("cpu", torch.float32).contiguous()
    return list(t.shape), t.numpy().tobytes()


def blob_tensor(shape: list[int], blob: memoryview | bytes) -> Tensor:
    """The tensor `tensor_blob` sent (copied: the frame's memory is not ours to keep)."""
    return torch.from_numpy(np.frombuffer(blob, dtype=np.float32).reshape(shape).copy())


class RemoteEngine:
    """The engine process, seen from a front end (the multi-process `EngineClient`)."""

    def __init__(self, address: str, control: ControlBlock, pool_name: str, slots: int) -> None:
        self.address, self.control = address, control
        self.pool_name, self.slot_count = pool_name, slots
        self.conn: EngineConnection | None = None
        self.pool: SlotPool | None = None
        self.generation = 0
        self._ready = False
        self._hello: dict[str, Any] = {}
        self._status: dict[str, Any] = {}
        self._input: ImageInput | None = None
        self._pidfd: int | None = None

    # --- lifecycle --------------------------------------------------------------------------
    async def attach(self) -> None:
        """Connect to the engine of the control block's current generation (ready already)."""
        pid, generation, ready, _ = self.control.engine()
        if not ready:
            raise errors.NotReady("the engine is not ready")
        conn = EngineConnection(self.address)
        conn.start()
        try:
            hello, _ = await conn.call("hello", {}, timeout=30)
            status, _ = await conn.call("status", {}, timeout=30)
        except BaseException:
            await conn.close()
            raise
        self.conn, self.generation, self._hello, self._status = conn, generation, hello, status
        self._input = self._image_input(hello)
        if self.pool is None and hello.get("slot_shape") is not None:
            self.pool = SlotPool(
                self.pool_name, self.slot_count, hello["slot_shape"], dtype=torch.uint8
            )
        self._watch_pid(pid)
        self._ready = True
        log.info("connected to the engine (pid %d, generation %d)", pid, generation)

    def _watch_pid(self, pid: int) -> None:
        self._close_pidfd()
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # died between ready and now
            self._lost()
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self._lost)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def _lost(self) -> None:
        """The engine process exited: every call in flight is a 503 now."""
        if not self._ready:
            return
        self._ready = False
        self._close_pidfd()
        failed = self.conn.fail_all(errors.NotReady(ENGINE_GONE)) if self.conn else 0
        log.error("the engine (generation %d) died; %d calls failed with 503", self.generation,
                  failed)  # fmt: skip

    async def watch(self) -> None:
        """Follow the engine: status every STATUS_EVERY_S, reconnect to a new generation."""
        since_status = 0.0
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            _, generation, ready, _ = self.control.engine()
            if generation != self.generation:
                self._lost()
                if ready:
                    with contextlib.suppress(errors.PromptServeError):
                        await self._reconnect()
                continue
            since_status += WATCH_EVERY_S
            if self._ready and self.conn is not None and since_status >= STATUS_EVERY_S:
                since_status = 0.0
                with contextlib.suppress(errors.PromptServeError):
                    self._status, _ = await self.conn.call("status", {}, timeout=5)

    async def _reconnect(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None
        await self.attach()

    async def close(self) -> None:
        self._ready = False
        self._close_pidfd()
        if self.conn is not None:
            await self.conn.close()
        if self.pool is not None:
            self.pool.close()

    # --- EngineClient -----------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def capabilities(self) -> frozenset[Capability]:
        return frozenset(self._hello.get("capabilities", ()))

    def describe(self) -> dict[str, str]:
        return dict(self._hello.get("describe", {}))

    def image_input(self) -> ImageInput:
        if self._input is None:
            raise errors.NotReady("not connected to the engine")
        return self._input

    def load(self) -> Load:
        per = self.control.engine()[3]
        return Load(int(self._status.get("queue_depth", 0)), per or None)

    def health(self) -> dict[str, Any]:
        return dict(self._status.get("health", {}))

    def stats(self) -> dict[str, float]:
        return dict(self._status.get("stats", {}))

    async def residents(self) -> dict[str, Any]:
        answer, _ = await self._call("residents", {}, [], None)
        return dict(answer)

    async def classify(self, work: ClassifyWork) -> list[ClassifyResult]:
        body = {
            "request_id": work.request_id,
            "refs": list(work.refs),
            "adhoc": None if work.adhoc is None else asdict(work.adhoc),
            "top_k": work.top_k,
            "deadline": work.deadline,
        }
        answer, _ = await self._with_images("classify", body, work.images, work.deadline)
        return msgspec.convert(answer, list[ClassifyResult])

    async def embed(self, work: EmbedWork) -> EmbedResult:
        body = {"request_id": work.request_id, "ref": work.ref, "texts": list(work.texts),
                "deadline": work.deadline}  # fmt: skip
        answer, blobs = await self._with_images("embed", body, work.images, work.deadline)
        out: dict[str, Tensor | None] = {"images": None, "texts": None}
        for key, shape in answer["shapes"].items():
            out[key] = blob_tensor(shape, blobs[answer["order"].index(key)])
        return EmbedResult(answer["checkpoint"], answer["version"], out["images"], out["texts"])

    async def publish(self, data: bytes, activate: bool) -> Published:
        answer, _ = await self._call("publish", {"activate": activate}, [data], None)
        return Published(**answer)

    async def labels(self, ref: str) -> tuple[str, ...]:
        answer, _ = await self._call("labels", {"ref": ref}, [], None)
        return tuple(answer)

    def forget(self, name: str) -> None:
        # fire and forget: the store's deletion event reaches the engine anyway; this only
        # makes it immediate, as in one process
        if self.conn is not None and self._ready:
            task = asyncio.get_running_loop().create_task(
                self._call("forget", {"name": name}, [], 5)
            )
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # --- calls ------------------------------------------------------------------------------
    async def _call(
        self, method: str, body: dict[str, Any], blobs: list[bytes], timeout: float | None
    ) -> tuple[Any, list[memoryview]]:
        if not self._ready or self.conn is None:
            raise errors.NotReady(ENGINE_GONE)
        return await self.conn.call(method, body, blobs, timeout)

    async def _with_images(
        self, method: str, body: dict[str, Any], images: Images | None, deadline: float
    ) -> tuple[Any, list[memoryview]]:
        """A call that carries images: in slots (released when the engine has answered), or
        as compressed bytes when the engine decodes on its device."""
        if images is None:
            return await self._call(method, body, [], None)
        if not isinstance(images, Tensor):
            return await self._call(method, {**body, "encoded": len(images)}, list(images), None)
        if self.pool is None:
            raise errors.NotReady("the engine takes no preprocessed images")
        pool = self.pool
        slots = pool.put(images.to(pool.dtype).contiguous())
        body = {**body, "segment": pool.name, "count": pool.count, "slots": slots}
        call = asyncio.ensure_future(self._call(method, body, [], None))
        call.add_done_callback(lambda _: pool.release(slots))
        # Shielded: a caller that leaves (deadline, disconnect) does not cancel the call, so its
        # slots stay taken until the engine has answered. The engine answers a call past its
        # deadline with 504 itself; a little grace covers the hop.
        remaining = max(0.0, deadline - time.monotonic()) + 1.0
        try:
            return await asyncio.wait_for(asyncio.shield(call), remaining)
        except TimeoutError:
            raise errors.DeadlineExceeded("deadline passed while the engine worked") from None

    @staticmethod
    def _image_input(hello: dict[str, Any]) -> ImageInput:
        cfg = hello.get("preprocess")
        # the PIL steps here, as uint8 crops; the engine finishes them (engine/host.py)
        preprocess = None if cfg is None else transform_of(cfg, crop_only=True)
        return ImageInput(preprocess, int(hello.get("side", 0)))


@contextlib.asynccontextmanager
async def remote_engine(
    address: str, control: ControlBlock, pool_name: str, slots: int
) -> AsyncIterator[RemoteEngine]:
    """A front end's engine: connected, followed while in use, closed after."""
    engine = RemoteEngine(address, control, pool_name, slots)
    await engine.attach()
    watcher = asyncio.get_running_loop().create_task(engine.watch(), name="engine-watch")
    try:
        yield engine
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await engine.close()
