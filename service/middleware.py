"""ASGI middleware: the request body read whole, within size and time bounds; request ids."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyTimeout, BodyTooLarge

log = logging.getLogger(__name__)

SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


MAX_JSON_VALUES = 200_000  # our largest request (a job of 2,000 uploaded images) holds ~10,000


class BodyReader:
    """Read the whole request body before the app sees the request, within bounds.

    - size: over `limit` bytes (or the path's own, in `limits`) is a 413, at once from
      Content-Length, else while streaming;
    - time: a body that stalls for `idle_timeout_s` between chunks, or is not complete within
      `timeout_s`, is a 408 and the connection is closed (a client that sends headers and a few
      bytes, then stalls, held its slot for as long as it liked);
    - disconnect: a client that hangs up mid-body is not an error of ours: logged at INFO and
      counted through `on_disconnect`, and nothing is answered.
    Because the app runs only once the body has arrived, a request counts against admission
    from then on, not while a slow client is still sending it.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        timeout_s: float = 60.0,
        idle_timeout_s: float = 10.0,
        on_disconnect: Callable[[], None] | None = None,
        receiving: Callable[[float], None] | None = None,
        max_json_values: int = MAX_JSON_VALUES,
        limits: Mapping[str, int] | None = None,
    ) -> None:
        self.max_json_values = max_json_values
        self.app, self.limit, self.limits = app, limit, dict(limits or {})
        self.timeout_s, self.idle_timeout_s = timeout_s, idle_timeout_s
        self.on_disconnect = on_disconnect
        self.receiving = receiving or (lambda delta: None)  # bodies being received (a gauge)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            await _reject(send, 400, "bad_request", "Content-Length is not a number")
            return
        limit = self.limits.get(scope.get("path", ""), self.limit)
        if length is not None and int(length) > limit:
            await _reject(send, 413, BodyTooLarge.code, _too_large(limit))
            return
        if length is None and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body (GET, DELETE, ...)
            return
        self.receiving(1)
        try:
            body = await self._read(scope, receive, send, limit)
        finally:
            self.receiving(-1)
        if body is None:
            return
        if _is_json(headers) and (n := json_values_bound(body)) > self.max_json_values:
            # A 64 MiB body of `[[],[],...]` is millions of Python objects and seconds of
            # parsing for whoever parses it (FastAPI or us): counted on the bytes, refused unread.
            await _reject(
                send,
                413,
                "too_many_values",
                f"the JSON body holds up to {n} values; at most {self.max_json_values}",
            )
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: a disconnect, for streaming responses

        await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive, send: Send, limit: int) -> bytes | None:
        """The body, or None once the client has been answered (413/408) or has left."""
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            wait = min(self.idle_timeout_s, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.0))
            except TimeoutError:
                await _reject(
                    send, 408, BodyTimeout.code, _slow(self.idle_timeout_s, self.timeout_s)
                )
                return None
            if message["type"] == "http.disconnect":
                log.info(
                    "client %s left while sending the body of %s %s (%d bytes received)",
                    (scope.get("client") or ("?",))[0],
                    scope.get("method", ""),
                    scope.get("path", ""),
                    size,
                )
                if self.on_disconnect is not None:
                    self.on_disconnect()
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _reject(send, 413, BodyTooLarge.code, _too_large(limit))
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def json_values_bound(body: bytes) -> int:
    """An upper bound of the values in a JSON document, from its bytes alone: every value after
    the first in an array or object follows a comma, and every array or object opens with a
    bracket (commas inside strings only make the bound looser; base64 has none)."""
    return body.count(b",") + body.count(b"[") + body.count(b"{") + 1


def _is_json(headers: dict[bytes, bytes]) -> bool:
    ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    return ctype in (b"", b"application/json") or ctype.endswith(b"+json")


def _slow(idle: float, total: float) -> str:
    return (
        f"the request body was not received in time (at most {idle:g} s between chunks and "
        f"{total:g} s in all); send the body promptly"
    )


def _too_large(limit: int) -> str:
    return f"request body over {limit} bytes; send fewer or smaller images"


async def _reject(send: Send, status: int, code: str, message: str) -> None:
    body = error_body(code, message)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestId:
    """Take a sane X-Request-ID from the client or make one; return it on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if SAFE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers: list[Any] = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, tagged)
