"""Logging: one JSON object per line (for log shippers) or plain text, with the request id.

`configure("json")` makes the root logger write JSON lines with `ts`, `level`, `logger`, `msg`,
the request id of the request being served (when there is one) and any `extra={...}` fields.
`RequestLog` is the ASGI middleware that puts the id (set by `middleware.RequestId`) into a
context variable, so every line logged while serving a request carries it, threads included
(`asyncio.to_thread` copies the context), and writes one access line per request.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

LogFormat = Literal["json", "text"]

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "promptserve_request_id", default=None
)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
# uvicorn's `color_message` is its message again with terminal colour codes: not for a log file.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
access_log = logging.getLogger("promptserve.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per record; values that JSON cannot hold are written as strings."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            out["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """Control characters as visible escapes (`\\n`, `\\x1b`): a client-chosen path, header or
    class name can then never start a forged log line of its own or drive a terminal."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class TextFormatter(logging.Formatter):
    """Plain lines whose message is escaped; a traceback's lines are indented under it, so no
    part of a record can read as a line of its own at column 0."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        head, sep, rest = super().format(record).partition("\n")
        if not sep:
            return head
        return head + "\n" + "\n".join("    " + escape_controls(line) for line in rest.split("\n"))


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record, not at configure time: test
    runners and daemons swap (and close) it, and a stale stream raised "I/O operation on closed
    file" at exit."""

    _fixed: Any = None  # a stream given explicitly (tests capture into a buffer)

    @property
    def stream(self) -> Any:
        return self._fixed if self._fixed is not None else sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        # StreamHandler.__init__ assigns sys.stderr here: keep following it instead
        self._fixed = None if value is sys.stderr else value


class _RequestIdText(logging.Filter):
    """Text lines get the request id appended, so text and JSON logs can be correlated alike."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        if rid is not None and not getattr(record, "_rid_added", False):
            record.msg = f"{record.msg} [request_id={rid}]"
            record._rid_added = True
        return True


def configure(fmt: LogFormat = "text", level: str = "INFO") -> None:
    """Route every logger (uvicorn's and RQ's included) through one stderr handler."""
    handler = _StderrHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())  # json.dumps escapes control characters itself
    else:
        handler.setFormatter(TextFormatter())
        handler.addFilter(_RequestIdText())
    handler.set_name("promptserve")
    root = logging.getLogger()
    for old in list(root.handlers):  # ours from an earlier call; others' (pytest's) stay
        if old.get_name() == "promptserve":
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def redact_url(url: str) -> str:
    """`url` without its password (redis://:secret@host -> redis://:***@host), for logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


class RequestLog:
    """Sets the request-id context for the request and logs one access line when it ends.

    Must sit inside `RequestId` (added before it), which chose the id and put it in the scope.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = request_id.set((scope.get("state") or {}).get("request_id"))
        start = time.perf_counter()
        status = 500  # what the client sees if the app dies before answering

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            path = scope.get("path", "")
            # probes and scrapes every few seconds would drown the log: debug level for them
            level = logging.DEBUG if path in ("/healthz", "/readyz", "/metrics") else logging.INFO
            access_log.log(
                level,
                "%s %s %d",
                scope.get("method", ""),
                path,
                status,
                extra={
                    "method": scope.get("method", ""),
                    "path": path,
                    "status": status,
                    "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                    "client": (scope.get("client") or ("", 0))[0],
                },
            )
            request_id.reset(token)
