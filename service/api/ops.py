"""Health, readiness and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import ServicesDep

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready (or store down, strict)"}})
async def readyz(services: ServicesDep, strict: bool = False) -> Any:
    """Ready: backbone loaded and warm. The store's state is reported; with `strict=true` a
    degraded store also makes this 503 (by default replicas stay in rotation and keep serving
    resident checkpoints while the store is down)."""
    body: dict[str, Any] = {"status": "ready" if services.ready else "starting", **services.status}
    store_ok = True
    if services.residency is not None:
        health = services.residency.health()
        body.update(health)
        store_ok = health["store"] == "ok"
    ok = services.ready and (store_ok or not strict)
    return JSONResponse(body, status_code=200 if ok else 503)


# documented as text/plain (the exposition format), not FastAPI's default application/json
@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(services: ServicesDep) -> Response:
    """Prometheus exposition."""
    inference = services.inference
    if inference is not None:
        services.metrics.queue_depth.set(inference.batcher.queue_depth)
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
