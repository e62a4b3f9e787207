"""Calls from front-end processes to the engine process: ZeroMQ frames, msgpack bodies.

Why ZeroMQ (pyzmq): a ROUTER socket in the engine serves any number of front ends over one
`ipc://` path, routes each answer back to the front end that asked, queues while a peer
reconnects (an engine restart is a re-bind on the same path), and sends large frames (an
uploaded checkpoint) without copying them into a message body. It is what vLLM's V1 uses
between its API server and its engine core, for the same reasons. Bodies are msgpack
(msgspec: no code runs on decode, unlike pickle), a few hundred bytes per call; images never
travel here, only the numbers of the shared-memory slots that hold them (`engine/shm.py`).

A call is the frames `[request id, method, body, *blobs]`; its answer `[request id, b"ok",
body, *blobs]` or `[request id, b"err", {"type", "message"}]`, where "type" names a class of
the one error table, raised again in the front end with the same message: a 404 in the engine
is a 404 at the client, whichever process answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from service import errors

log = logging.getLogger(__name__)

Blobs = Sequence[bytes | memoryview]
Handler = Callable[[dict[str, Any], list[memoryview]], Awaitable[tuple[Any, Blobs]]]

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def _error_types() -> dict[str, type[errors.PromptServeError]]:
    found: dict[str, type[errors.PromptServeError]] = {}
    todo: list[type[errors.PromptServeError]] = [errors.PromptServeError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


class EngineServer:
    """The engine's side: one ROUTER socket, each call served by its handler in its own task."""

    def __init__(self, address: str, handlers: dict[str, Handler]) -> None:
        self.address, self.handlers = address, handlers
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(address)
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        """Answer calls until cancelled."""
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            if len(frames) < 4:
                continue  # not one of ours: nothing to answer
            task = asyncio.create_task(self._answer(frames))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, frames: list[zmq.Frame]) -> None:
        peer, rid, method = frames[0].bytes, frames[1].bytes, frames[2].bytes.decode()
        try:
            handler = self.handlers.get(method)
            if handler is None:
                raise errors.BadRequest(f"the engine has no call {method!r}")
            body, blobs = await handler(_decode(frames[3].buffer), [f.buffer for f in frames[4:]])
            reply = [peer, rid, b"ok", _encode(body), *blobs]
        except errors.PromptServeError as exc:
            reply = [
                peer,
                rid,
                b"err",
                _encode({"type": type(exc).__name__, "message": exc.message}),
            ]
        except Exception:
            log.exception("engine call %s failed", method)
            reply = [peer, rid, b"err", _encode({"type": "", "message": "internal engine error"})]
        with contextlib.suppress(zmq.ZMQError):  # the engine is stopping
            await self._sock.send_multipart(reply, copy=False)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._sock.close(0)
        self._ctx.term()


class EngineConnection:
    """A front end's side: calls to the engine; every call in flight fails at once with
    NotReady (503) when the engine is known to be dead (`fail_all`)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)
        self._ids = itertools.count(1)
        self._pending: dict[bytes, asyncio.Future[tuple[Any, list[memoryview]]]] = {}
        self._types = _error_types()
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="engine-replies")

    async def call(
        self, method: str, body: Any, blobs: Blobs = (), timeout: float | None = None
    ) -> tuple[Any, list[memoryview]]:
        """The engine's answer to one call; raises what the engine raised (same error class)."""
        if self._reader is None:
            raise errors.NotReady("not connected to the engine")
        rid = next(self._ids).to_bytes(8, "little")
        future: asyncio.Future[tuple[Any, list[memoryview]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[rid] = future
        try:
            await self._sock.send_multipart(
                [rid, method.encode(), _encode(body), *blobs], copy=False
            )
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise errors.DeadlineExceeded("deadline passed while the engine worked") from None
        finally:
            self._pending.pop(rid, None)

    def fail_all(self, error: errors.PromptServeError) -> int:
        """Fail every call in flight (the engine died); returns how many there were."""
        failed = 0
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(error)
                failed += 1
        return failed

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            future = self._pending.get(frames[0].bytes)
            if future is None or future.done():
                continue  # its caller left (deadline) or it was failed already
            status, body = frames[1].bytes, _decode(frames[2].buffer)
            if status == b"ok":
                future.set_result((body, [f.buffer for f in frames[3:]]))
            else:
                cls = self._types.get(body.get("type", ""))
                if cls is None:
                    future.set_exception(RuntimeError(body.get("message", "engine error")))
                else:
                    future.set_exception(cls(body["message"]))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self.fail_all(errors.NotReady("shutting down"))
        self._sock.close(0)
        self._ctx.term()
