"""Front end -> engine calls over ZeroMQ: answers, the engine's errors raised again with their
class (so their HTTP status) in the front end, blobs both ways, and every call in flight failed
at once when the engine is known dead."""

from __future__ import annotations

import asyncio

import pytest

from service import errors
from service.engine import ipc
from service.engine.ipc import EngineConnection, EngineServer


def run(address: str, handlers, body):
    async def main():
        server = EngineServer(address, handlers)
        serving = asyncio.create_task(server.serve())
        conn = EngineConnection(address)
        conn.start()
        try:
            return await body(conn)
        finally:
            await conn.close()
            serving.cancel()
            server.close()

    return asyncio.run(main())


def test_calls_errors_and_blobs(tmp_path, monkeypatch):
    messages: list[list] = []  # the calls of each message the engine received
    received = EngineServer._received

    def counting(self, frames):
        messages.append(ipc._decode(frames[1].buffer))
        received(self, frames)

    monkeypatch.setattr(EngineServer, "_received", counting)

    async def echo(args, blobs):
        return {"got": args["x"] * 2, "sizes": [len(b) for b in blobs]}, [b"back" * 3]

    async def missing(args, blobs):
        raise errors.NotFound(f"checkpoint {args['name']!r} has no active version")

    async def broken(args, blobs):
        raise ZeroDivisionError  # a bug in the engine: not leaked as such

    async def body(conn):
        answer, blobs = await conn.call("echo", {"x": 21}, [b"abc", b"\0" * 1000])
        assert answer == {"got": 42, "sizes": [3, 1000]} and bytes(blobs[0]) == b"backbackback"
        with pytest.raises(errors.NotFound) as exc:
            await conn.call("missing", {"name": "eurosat"})
        assert errors.http_status(exc.value) == 404 and "eurosat" in exc.value.message
        with pytest.raises(RuntimeError, match="internal engine error"):
            await conn.call("broken", {})
        with pytest.raises(errors.BadRequest):
            await conn.call("nope", {})
        # many calls at once are each answered with their own result, and the calls of one
        # turn of the event loop travel as one message (what the engine's CPU per call rests on)
        before = len(messages)
        results = await asyncio.gather(*(conn.call("echo", {"x": i}) for i in range(50)))
        assert [r[0]["got"] for r in results] == [2 * i for i in range(50)]
        assert len(messages) - before == 1 and len(messages[-1]) == 50

    run(f"ipc://{tmp_path}/engine", {"echo": echo, "missing": missing, "broken": broken}, body)


def test_calls_in_flight_fail_at_once_when_the_engine_is_dead(tmp_path):
    gate = asyncio.Event()

    async def slow(args, blobs):
        await gate.wait()
        return {}, []

    async def body(conn):
        calls = [asyncio.create_task(conn.call("slow", {})) for _ in range(3)]
        while conn.in_flight < 3:
            await asyncio.sleep(0.01)
        assert conn.fail_all(errors.NotReady("the engine stopped")) == 3
        for call in calls:
            with pytest.raises(errors.NotReady):
                await call
        gate.set()

    run(f"ipc://{tmp_path}/engine", {"slow": slow}, body)
