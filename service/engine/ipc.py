"""Calls from front-end processes to the engine process: ZeroMQ frames, msgpack bodies.

Why ZeroMQ (pyzmq): a ROUTER socket in the engine serves any number of front ends over one
`ipc://` path, routes each answer back to the front end that asked, queues while a peer
reconnects (an engine restart is a re-bind on the same path), and sends large frames (an
uploaded checkpoint) without copying them into a message body. It is what vLLM's V1 uses
between its API server and its engine core, for the same reasons. Bodies are msgpack
(msgspec: no code runs on decode, unlike pickle), a few hundred bytes per call; images never
travel here, only the numbers of the shared-memory slots that hold them (`engine/shm.py`).

A message is one msgpack frame, a list of calls `[[call id, method, body], ...]`, followed by
the blobs of its call when it carries any (then it is that call's alone). Its answers come back
the same way, `[[call id, "ok", body], ...]` or `[[call id, "err", {"type", "message"}]]`, where
"type" names a class of the one error table, raised again in the front end with the same
message: a 404 in the engine is a 404 at the client, whichever process answered. Each side
sends what one turn of its event loop produced as one message (`_Outbox`): under load, the
engine decodes one frame for the calls of many requests and answers them with one frame.

Both ends use plain (blocking-API) sockets that never block: the event loop watches the
socket's file descriptor and a callback drains every message queued (`_Wire`). pyzmq's
asyncio sockets wrap each send and receive in futures and poller bookkeeping; that was two
thirds of the engine's CPU per call (docs/PERFORMANCE.md, issue 16), and the engine's CPU
per call is what bounds the images per second one engine core can dispatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import msgspec
import zmq

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


class _Wire:
    """A ZeroMQ socket run by the event loop: `on_message` gets every message as it arrives.

    ZeroMQ's descriptor is edge-triggered: it signals a change of the socket's events, not
    that messages wait. So every wake-up, and every send (a send can take in the peer's
    messages without a new edge), drains until nothing is left. Sends never block: the high
    water marks are off (a front end's calls are bounded by its admission, the engine's
    answers by the calls it got).
    """

    def __init__(self, kind: int, on_message: Callable[[list[zmq.Frame]], None]) -> None:
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(kind)
        for option in (zmq.LINGER, zmq.SNDHWM, zmq.RCVHWM):
            self.sock.setsockopt(option, 0)
        self._on_message = on_message
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[bytes | None, list[Any]] = {}

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self.drain)
        self._loop.call_soon(self.drain)  # messages that came before the first edge

    def drain(self) -> None:
        sock = self.sock
        while not sock.closed and cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._on_message(sock.recv_multipart(zmq.NOBLOCK, copy=False))

    def send(self, frames: Sequence[Any]) -> None:
        self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        self.drain()

    def post(self, peer: bytes | None, entry: list[Any]) -> None:
        """Send `entry` (a call or an answer, no blobs) with the others of this loop turn: one
        message per peer (`peer` is None on the front end's side, which has one)."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.setdefault(peer, []).append(entry)

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        for peer, entries in pending.items():
            body = _encode(entries)
            try:
                self.send([body] if peer is None else [peer, body])
            except zmq.ZMQError as exc:  # closed: the calls' owners are failed by close()
                log.debug("dropped %d entries for a closed socket: %s", len(entries), exc)

    def close(self) -> None:
        if self._loop is not None and not self.sock.closed:
            with contextlib.suppress(ValueError, OSError):  # the loop closed first
                self._loop.remove_reader(self.sock.fileno())
        self.sock.close(0)
        self._ctx.term()


def _entry(cid: int, word: str, body: Any) -> list[Any]:
    """One call or answer; its body encoded now, so that a body that cannot be encoded fails
    its own call, never the message it would have shared with others."""
    return [cid, word, msgspec.Raw(_encode(body))]


class EngineServer:
    """The engine's side: one ROUTER socket, each call served by its handler in its own task."""

    def __init__(self, address: str, handlers: dict[str, Handler]) -> None:
        self.address, self.handlers = address, handlers
        self._wire = _Wire(zmq.ROUTER, self._received)
        self._wire.sock.bind(address)
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        """Answer calls until cancelled."""
        self._wire.start()
        await asyncio.get_running_loop().create_future()  # the calls arrive by callback

    def _received(self, frames: list[zmq.Frame]) -> None:
        try:
            peer, calls = frames[0].bytes, _decode(frames[1].buffer)
            blobs = [f.buffer for f in frames[2:]]
            loop = asyncio.get_running_loop()
            for cid, method, body in calls:
                task = loop.create_task(self._answer(peer, cid, method, body, blobs))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (IndexError, TypeError, ValueError, msgspec.DecodeError):
            log.warning("ignored a message that is not a list of calls")  # not one of ours

    async def _answer(
        self, peer: bytes, cid: int, method: str, body: Any, blobs: list[memoryview]
    ) -> None:
        out: Blobs = ()
        try:
            handler = self.handlers.get(method)
            if handler is None:
                raise errors.BadRequest(f"the engine has no call {method!r}")
            answer, out = await handler(body, blobs)
            entry = _entry(cid, "ok", answer)
        except errors.PromptServeError as exc:
            entry = _entry(cid, "err", {"type": type(exc).__name__, "message": exc.message})
        except Exception:
            log.exception("engine call %s failed", method)
            entry = _entry(cid, "err", {"type": "", "message": "internal engine error"})
        if out:  # an answer with blobs travels alone
            with contextlib.suppress(zmq.ZMQError):  # the engine is stopping
                self._wire.send([peer, _encode([entry]), *out])
        else:
            self._wire.post(peer, entry)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._wire.close()


class EngineConnection:
    """A front end's side: calls to the engine; every call in flight fails at once with
    NotReady (503) when the engine is known to be dead (`fail_all`)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._wire = _Wire(zmq.DEALER, self._received)
        self._wire.sock.connect(address)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[Any, list[memoryview]]]] = {}
        self._types = _error_types()
        self._started = False

    def start(self) -> None:
        self._wire.start()
        self._started = True

    async def call(
        self, method: str, body: Any, blobs: Blobs = (), timeout: float | None = None
    ) -> tuple[Any, list[memoryview]]:
        """The engine's answer to one call; raises what the engine raised (same error class)."""
        if not self._started:
            raise errors.NotReady("not connected to the engine")
        cid = next(self._ids)
        future: asyncio.Future[tuple[Any, list[memoryview]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[cid] = future
        try:
            entry = _entry(cid, method, body)
            if blobs:
                try:
                    self._wire.send([_encode([entry]), *blobs])
                except zmq.ZMQError as exc:
                    raise errors.NotReady(f"the engine cannot be reached: {exc}") from None
            else:
                self._wire.post(None, entry)
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise errors.DeadlineExceeded("deadline passed while the engine worked") from None
        finally:
            self._pending.pop(cid, None)

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

    def _received(self, frames: list[zmq.Frame]) -> None:
        blobs = [f.buffer for f in frames[1:]]
        for cid, status, body in _decode(frames[0].buffer):
            future = self._pending.get(cid)
            if future is None or future.done():
                continue  # its caller left (deadline) or it was failed already
            if status == "ok":
                future.set_result((body, blobs))
                continue
            cls = self._types.get(body.get("type", ""))
            if cls is None:
                future.set_exception(RuntimeError(body.get("message", "engine error")))
            else:
                future.set_exception(cls(body["message"]))

    async def close(self) -> None:
        self._started = False
        self.fail_all(errors.NotReady("shutting down"))
        self._wire.close()
