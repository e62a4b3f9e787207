"""The engine process of `--frontends N`: the backbone, residency, batcher and zero-shot cache
(the same `start_engine` as one process), served to the front ends over engine/ipc.py.

Each call is answered by the in-process `Engine`: the handlers below only turn the wire's
small values into protocol.py's and back, and read a request's images from the slots of the
front end that sent it (engine/shm.py). The engine reports ready in the control block once it
is warm, and writes its measured seconds per request there for every front end's admission.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any, cast

import torch

import prompts_store as ps
from service.backbones.base import Backbone
from service.backbones.clip import ClipBackbone
from service.engine.control import ControlBlock
from service.engine.core import Engine, start_engine
from service.engine.ipc import Blobs, EngineServer, Handler
from service.engine.protocol import AdHoc, ClassifyWork, EmbedWork, Images
from service.engine.remote import tensor_blob
from service.engine.shm import SlotReader

log = logging.getLogger(__name__)

SPEED_EVERY_S = 0.2  # how often admission's seconds-per-request figure is refreshed


class Handlers:
    """The engine's calls, by name (EngineServer's table)."""

    def __init__(self, engine: Engine, shm_dir: Path) -> None:
        self.engine, self.shm_dir = engine, shm_dir
        self.readers: dict[str, SlotReader] = {}

    def table(self) -> dict[str, Handler]:
        return {
            "hello": self.hello,
            "status": self.status,
            "residents": self.residents,
            "classify": self.classify,
            "embed": self.embed,
            "publish": self.publish,
            "labels": self.labels,
            "forget": self.forget,
        }

    async def hello(self, body: dict[str, Any], blobs: list[memoryview]) -> tuple[Any, Blobs]:
        """What a front end needs once: capabilities, /readyz facts, how to prepare images."""
        engine = self.engine
        answer: dict[str, Any] = {
            "capabilities": sorted(engine.capabilities),
            "describe": engine.describe(),
            "preprocess": None,
            "slot_shape": None,
            "side": 0,
        }
        if "classify" in engine.capabilities:
            image_input = engine.image_input()
            clip = cast(ClipBackbone, engine.backbone)
            answer["side"] = image_input.side
            if image_input.preprocess is not None:  # else: the engine decodes bytes itself
                answer["preprocess"] = clip.preprocess_config()
                answer["slot_shape"] = [3, *clip.image_size]  # uint8 crops
        return answer, ()

    async def status(self, body: dict[str, Any], blobs: list[memoryview]) -> tuple[Any, Blobs]:
        engine = self.engine
        health = await asyncio.to_thread(engine.health)
        stats = await asyncio.to_thread(engine.stats)
        return {"health": health, "stats": stats, "queue_depth": engine.load().queue_depth}, ()

    async def residents(self, body: dict[str, Any], blobs: list[memoryview]) -> tuple[Any, Blobs]:
        return await self.engine.residents(), ()

    async def classify(self, body: dict[str, Any], blobs: list[memoryview]) -> tuple[Any, Blobs]:
        images = self._images(body, blobs)  # first: the front end may reuse slots after we answer
        adhoc = body["adhoc"]
        work = ClassifyWork(
            request_id=body["request_id"],
            refs=tuple(body["refs"]),
            adhoc=None if adhoc is None else AdHoc(
                tuple(adhoc["classnames"]),
                None if adhoc["templates"] is None else tuple(adhoc["templates"]),
            ),
            images=images,
            top_k=body["top_k"],
            deadline=body["deadline"],
        )  # fmt: skip
        return await self.engine.classify(work), ()

    async def embed(self, body: dict[str, Any], blobs: list[memoryview]) -> tuple[Any, Blobs]:
        images = self._images(body, blobs) if ("slots" in body or "encoded" in body) else None
        work = EmbedWork(body["request_id"], body["ref"], images, tuple(body["texts"]),
                         body["deadline"])  # fmt: skip
        result = await self.engine.embed(work)
        shapes, order, out = {}, [], []
        for key, t in (("images", result.images), ("texts", result.texts)):
            if t is not None:
                shapes[key], blob = tensor_blob(t)
                order.append(key)
                out.append(blob)
        answer = {"checkpoint": result.checkpoint, "version": result.version, "shapes": shapes,
                  "order": order}  # fmt: skip
        return answer, out

    async def publish(self, body: dict[str, Any], blobs: list[memoryview]) -> tuple[Any, Blobs]:
        return await self.engine.publish(bytes(blobs[0]), bool(body["activate"])), ()

    async def labels(self, body: dict[str, Any], blobs: list[memoryview]) -> tuple[Any, Blobs]:
        return list(await self.engine.labels(body["ref"])), ()

    async def forget(self, body: dict[str, Any], blobs: list[memoryview]) -> tuple[Any, Blobs]:
        self.engine.forget(body["name"])
        return None, ()

    def _images(self, body: dict[str, Any], blobs: list[memoryview]) -> Images:
        if "encoded" in body:  # compressed bytes for the device decoder
            return tuple(bytes(b) for b in blobs)
        # uint8 crops cross (a quarter of float32's bytes), copied out of the slots here; the
        # batcher's worker moves and normalizes each batch (classifier.encode_batch)
        return self._reader(body["segment"], body["count"]).read(body["slots"])

    def _reader(self, segment: str, count: int) -> SlotReader:
        reader = self.readers.get(segment)
        if reader is None:
            # A new segment: a front end started (or was replaced). Unmap the segments whose
            # files are gone (their front ends died), so their memory is freed.
            for name in [n for n in self.readers if not (self.shm_dir / n).exists()]:
                self.readers.pop(name).close()
            clip = cast(ClipBackbone, self.engine.backbone)
            reader = SlotReader(segment, count, [3, *clip.image_size], self.shm_dir, torch.uint8)
            self.readers[segment] = reader
        return reader

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


async def serve_engine(
    settings: Any,
    backbone: Backbone,
    store: ps.PromptStore,
    control: ControlBlock,
    address: str,
    generation: int,
    shm_dir: Path,
    on_batch: Any = None,
) -> None:
    """Start the engine, report ready, answer calls until SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with start_engine(settings, backbone, store, on_batch) as engine:
        handlers = Handlers(engine, shm_dir)
        server = EngineServer(address, handlers.table())
        serving = loop.create_task(server.serve(), name="engine-calls")
        control.set_engine(os.getpid(), generation, True)
        log.info("engine ready (pid %d, generation %d) on %s", os.getpid(), generation, address)
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), SPEED_EVERY_S)
                control.set_seconds_per_request(engine.load().seconds_per_request or 0.0)
        finally:
            log.info("engine stopping")
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            server.close()
            handlers.close()
