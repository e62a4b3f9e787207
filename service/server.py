"""The HTTP server around the app: uvicorn, with a deadline for a request's headers.

uvicorn (h11) times out only idle keep-alive connections, and any byte received cancels even
that: a client that opens a connection and trickles header bytes, or never finishes them, holds
it forever. `HeaderTimeout` closes such a connection once `header_timeout_s` has passed since the
connection opened (or since the previous response on it) without a complete request head: with
a 408 when part of a head arrived, quietly when nothing did. The body's own bounds are
`middleware.BodyReader`'s.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.middleware import error_body
from service.settings import Settings


class HeaderTimeout(H11Protocol):
    """h11 protocol whose connections must deliver each request head within a deadline."""

    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._seen_cycle: Any = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._heard = True
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and cycle is not self._seen_cycle and not cycle.response_complete:
            self._seen_cycle = cycle  # a complete request head arrived: the body has its own bounds
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._heard = False  # nothing of the next request yet
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()  # type: ignore[union-attr]
            self._head_timer = None

    def _expire(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle is not self._seen_cycle and not cycle.response_complete:
            return  # a head completed in the same tick
        if cycle is not None and not cycle.response_complete:
            return  # a request is being served: not ours to cut
        if not self._heard:
            # Nothing sent at all: close quietly. A 408 here could cross a request the client
            # is sending at this moment and be read as its answer.
            self.transport.close()
            return
        body = error_body(
            "header_timeout",
            f"the request head was not received within {self.header_timeout_s:g} s",
        )
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        self.transport.close()


def protocol(settings: Settings) -> type[H11Protocol]:
    """The h11 protocol class with this service's header deadline."""
    return type("HeaderTimeout", (HeaderTimeout,), {"header_timeout_s": settings.header_timeout_s})


def config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's configuration for this service: the one place its knobs are set."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "http": protocol(settings),
        "timeout_graceful_shutdown": int(settings.shutdown_timeout_s),
        "log_level": "info",
        # no config of uvicorn's own: its loggers propagate to our one (escaping) handler
        "log_config": None,
        "access_log": False,  # service.logs.RequestLog writes access lines, with the request id
        **overrides,
    }
    return uvicorn.Config(app, **options)
