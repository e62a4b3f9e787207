"""Errors over HTTP: the handlers that answer every failure from the one table, and the
documented error responses of each route, derived from the same table (service/errors.py)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service import errors
from service.metrics import Metrics
from service.schemas import ErrorResponse

log = logging.getLogger(__name__)

# What every route that reads a body and needs a key can answer; routes add their own.
COMMON = (400, 401, 413, 422, 429, 503)
# the error codes FastAPI's own validation and routing answer with (not PromptServeErrors)
_FRAMEWORK = {400: ["bad_request"], 404: ["not_found"], 422: ["invalid_request"]}


def _codes() -> dict[int, list[str]]:
    """HTTP status -> the error codes the table maps to it (every PromptServeError class)."""
    out: dict[int, list[str]] = {s: list(c) for s, c in _FRAMEWORK.items()}
    seen: list[type[errors.PromptServeError]] = [errors.PromptServeError]
    while seen:
        cls = seen.pop()
        seen.extend(cls.__subclasses__())
        status = errors.status_of(cls)
        if status != 500 and cls.code not in out.setdefault(status, []):
            out[status].append(cls.code)
    return {s: sorted(c) for s, c in out.items()}


CODES = _codes()


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these statuses: the error body, and which codes each carries."""
    return {
        status: {
            "model": ErrorResponse,
            "description": "error codes: " + ", ".join(CODES.get(status, ["error"])),
        }
        for status in sorted(set(statuses))
    }


def install(app: FastAPI, metrics: Metrics) -> None:
    """Answer every exception as `{"error": {"code", "message"}}` with the table's status."""

    def respond(status: int, code: str, message: str) -> JSONResponse:
        metrics.errors.labels(code).inc()
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if status in (429, 503):  # tell clients when to come back instead of hammering
            headers = {"Retry-After": "1"}
        return JSONResponse(
            {"error": {"code": code, "message": message}}, status_code=status, headers=headers
        )

    def detail(problems: list[Any]) -> str:
        text = "; ".join(
            f"{'.'.join(str(x) for x in p.get('loc', ()))}: {p.get('msg')}" for p in problems[:5]
        )
        return text[:2000]

    @app.exception_handler(errors.PromptServeError)
    async def ours(request: Request, exc: errors.PromptServeError) -> JSONResponse:
        return respond(errors.http_status(exc), exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = list(exc.errors())
        if any(p.get("type") == "json_invalid" for p in problems):
            return respond(400, "bad_request", "body is not valid JSON")
        return respond(422, "invalid_request", detail(problems))

    @app.exception_handler(ValidationError)
    async def invalid_model(request: Request, exc: ValidationError) -> JSONResponse:
        return respond(422, "invalid_request", detail(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
        return respond(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(ClientDisconnect)
    async def left(request: Request, exc: ClientDisconnect) -> Response:
        # The client hung up: not an error of ours, and nobody reads an answer.
        log.info("client left during %s %s", request.method, request.url.path)
        metrics.disconnects.inc()
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return respond(500, "internal", "internal error; it has been logged")
