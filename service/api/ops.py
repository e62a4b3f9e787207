"""Health, readiness and metrics.

What a caller without a key may see (when keys are configured): `/healthz`, and `/readyz`'s
status code with `{"status"}` only, which is all a load balancer's probe needs. The details
(backbone, runtime, fingerprint, store, residency) and `/metrics` need a key, unless
PROMPTSERVE_METRICS_PUBLIC=true (a scrape network of its own); Prometheus sends a key with
`authorization: {credentials_file: ...}` in its scrape config.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import errors
from service.api.deps import MaybeEngineDep, MetricsDep, OpsViewer
from service.schemas import ErrorResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive: the process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        401: {"model": ErrorResponse, "description": "a key was sent and is not valid"},
        503: {"description": "not ready (or store down, strict)"},
    },
    openapi_extra={"security": [{}]},  # the key is optional here: {} = anonymous allowed
)
async def readyz(engine: MaybeEngineDep, viewer: OpsViewer, strict: bool = False) -> Any:
    """Ready: backbone loaded and warm. The store's state is reported; with `strict=true` a
    degraded store also makes this 503 (by default replicas stay in rotation and keep serving
    resident checkpoints while the store is down)."""
    body: dict[str, Any] = {"status": "starting"}
    store_ok = True
    if engine is not None:
        health = engine.health()
        body = {"status": "ready", **engine.describe(), **health}
        store_ok = health["store"] == "ok"
    ok = engine is not None and (store_ok or not strict)
    if viewer is None:  # no key: the verdict only
        body = {"status": body["status"]}
    return JSONResponse(body, status_code=200 if ok else 503)


# documented as text/plain (the exposition format), not FastAPI's default application/json
_JSON_ERROR = {"application/json": {"schema": ErrorResponse.model_json_schema()}}


@router.get(
    "/metrics",
    response_class=PlainTextResponse,  # the exposition format; its errors are JSON like all others
    responses={401: {"description": "no key, or not a valid one", "content": _JSON_ERROR}},
)
async def metrics(metrics: MetricsDep, viewer: OpsViewer) -> Response:
    """Prometheus exposition (needs a key unless PROMPTSERVE_METRICS_PUBLIC=true)."""
    if viewer is None:
        raise errors.Unauthorized(
            "/metrics needs an API key (Authorization: Bearer <key>); set "
            "PROMPTSERVE_METRICS_PUBLIC=true to scrape without one on a private network"
        )
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
