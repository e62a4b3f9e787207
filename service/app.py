"""create_app(settings): the FastAPI application and the lifespan that wires its parts.

The lifespan loads the backbone once, opens the store, starts residency (hot swap) and the
batcher, warms the model up, and only then reports ready. No module globals: everything hangs
off `app.state.services`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from prompts_store import open_store
from service import __version__, errors
from service.api import answer, checkpoints, classify, introspect, jobs, ops
from service.api.deps import Services
from service.backbones.clip import ClipBackbone, load_clip
from service.backbones.llava import LlavaBackbone, load_llava
from service.engine.batcher import Batcher
from service.engine.forward import encode
from service.engine.gpu_images import select_image_decode
from service.engine.inference import Inference
from service.engine.residency import Residency
from service.engine.runtimes.select import describe as describe_runtime
from service.engine.runtimes.select import select_runtime
from service.engine.zeroshot_cache import ZeroShotCache
from service.images import ImageLimits, PixelBudget
from service.logs import RequestLog, redact_url
from service.metrics import Metrics
from service.middleware import BodyReader, RequestId
from service.settings import Settings
from service.training.local_jobs import jobs_for
from service.ui import routes as console

log = logging.getLogger(__name__)


def load_backbone(settings: Settings) -> ClipBackbone:
    """The frozen backbone the settings name (raises with the fix when weights are missing)."""
    if settings.backbone == "llava":
        return load_llava(  # type: ignore[return-value]  # create_app tells the two apart
            settings.model,
            settings.pretrained,
            device=settings.device,
            precision=settings.precision,
            cache_dir=settings.cache_dir,
        )
    return load_clip(
        settings.model,
        settings.pretrained,
        model_config=settings.model_config_path,
        device=settings.device,
        precision=settings.precision,
        cache_dir=settings.cache_dir,
    )


def _side(backbone: ClipBackbone) -> int:
    """The model's input side (the preprocessing's resize target)."""
    size = backbone.visual.image_size
    return int(size[0] if isinstance(size, tuple) else size)


async def _warm_up(backbone: ClipBackbone, batcher: Batcher) -> None:
    """One batch through the whole path, so the first request does not pay for allocation."""
    from service.engine.inference import PLAIN_PLAN

    size = backbone.visual.image_size
    hw = size if isinstance(size, tuple) else (size, size)
    await batcher.submit(torch.zeros(1, 3, *hw), [PLAIN_PLAN], lambda f: f, None)
    await asyncio.to_thread(backbone.text_features, ["warm up"])


def create_app(settings: Settings, backbone: ClipBackbone | LlavaBackbone | None = None) -> FastAPI:
    """The application; `backbone` may be injected (tests) instead of loaded from settings."""
    services = Services(settings=settings, metrics=Metrics(lambda: services.residency))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bb = backbone if backbone is not None else await asyncio.to_thread(load_backbone, settings)
        if isinstance(bb, LlavaBackbone):  # instruction answering: its own wiring
            from service.generative.wiring import llava_lifespan

            async with llava_lifespan(app, services, bb):
                yield
            return
        store = open_store(settings.store)
        services.jobs = jobs_for(settings)
        residency = Residency(
            store,
            bb,
            device_budget=settings.device_budget_mib * 2**20,
            host_budget=settings.host_budget_mib * 2**20,
            max_checkpoint_bytes=settings.max_checkpoint_bytes,
        )
        residency.start()
        runtime, reason = select_runtime(
            settings.runtime,
            bb,
            cache_dir=settings.onnx_cache_dir,
            threads=settings.onnx_threads,
            int8=settings.onnx_int8,
            max_batch=settings.max_batch_size,
        )
        log.info("runtime %s: %s", runtime.name, reason)
        gpu_images, decode_reason = select_image_decode(settings.image_decode, bb)
        log.info("image decode: %s", decode_reason)
        # CUDA graphs are captured (ONNX graphs exported/loaded) here, before /readyz says ready.
        await asyncio.to_thread(getattr(runtime, "warm_up", lambda: None))
        batcher = Batcher(
            functools.partial(encode, bb, runtime=runtime),
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            on_batch=services.metrics.batch_size.observe,
        )
        await batcher.start()
        services.backbone, services.store, services.residency = bb, store, residency
        services.inference = Inference(
            backbone=bb,
            residency=residency,
            batcher=batcher,
            zeroshot=ZeroShotCache(
                bb,
                settings.zeroshot_cache_entries,
                settings.max_adhoc_classes,
                text_encoder=getattr(runtime, "encode_text_ids", None),
                max_texts=settings.max_adhoc_texts,
                run=batcher.run_on_worker,
            ),
            limits=ImageLimits(
                max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
            ),
            max_images=settings.max_images,
            timeout_s=settings.request_timeout_s,
            max_batch=settings.max_batch_size,
            max_admitted=settings.max_queue + settings.max_batch_size,
            max_queue_wait_s=settings.max_queue_wait_s,
            max_request_pixels=settings.max_request_pixels,
            pixels=PixelBudget(settings.max_decode_pixels),
            gpu_images=gpu_images,
            draft=_side(bb) if settings.jpeg_draft else None,
        )
        await _warm_up(bb, batcher)
        services.status = {
            "backbone": bb.model_name,
            "pretrained": bb.pretrained,
            "device": str(bb.device),
            "fingerprint": bb.fingerprint,
            **describe_runtime(runtime, reason),
            "image_decode": decode_reason,
        }
        services.ready = True
        log.info(
            "ready: %s on %s, runtime %s, store %s, auth %s",
            bb.model_name,
            bb.device,
            runtime.name,
            settings.store.split("@")[-1],
            "keys" if settings.auth_enabled else "none",
            extra={  # the same facts as fields, for JSON logs (the store URL without password)
                "backbone": bb.model_name,
                "pretrained": bb.pretrained,
                "fingerprint": bb.fingerprint,
                "device": str(bb.device),
                "runtime": runtime.name,
                "store": redact_url(settings.store),
                "auth": "keys" if settings.auth_enabled else "none",
            },
        )
        try:
            yield
        finally:
            services.ready = False
            await batcher.stop()
            residency.close()
            store.close()
            if services.jobs is not None:
                services.jobs.close()

    app = FastAPI(title="promptserve", version=__version__, lifespan=lifespan)
    app.state.services = services
    app.include_router(classify.router)
    app.include_router(answer.router)
    app.include_router(checkpoints.router)
    app.include_router(jobs.router)
    app.include_router(ops.router)
    app.include_router(introspect.router)
    console.install(app, settings)  # /ui (the web console) and / leading to it
    _error_handlers(app, services)
    app.add_middleware(
        BodyReader,
        limit=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
        idle_timeout_s=settings.body_idle_timeout_s,
        on_disconnect=services.metrics.disconnects.inc,
        receiving=services.metrics.receiving.inc,
    )
    app.add_middleware(RequestLog)  # inside RequestId: it reads the id RequestId chose
    app.add_middleware(RequestId)
    return app


def _error_handlers(app: FastAPI, services: Services) -> None:
    def respond(status: int, code: str, message: str) -> JSONResponse:
        services.metrics.errors.labels(code).inc()
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if status in (429, 503):  # tell clients when to come back instead of hammering
            headers = {"Retry-After": "1"}
        return JSONResponse(
            {"error": {"code": code, "message": message}}, status_code=status, headers=headers
        )

    @app.exception_handler(errors.PromptServeError)
    async def ours(request: Request, exc: errors.PromptServeError) -> JSONResponse:
        return respond(errors.http_status(exc), exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return respond(400, "bad_request", "body is not valid JSON")
        detail = "; ".join(
            f"{'.'.join(str(x) for x in p.get('loc', ()))}: {p.get('msg')}" for p in problems[:5]
        )
        return respond(422, "invalid_request", detail[:2000])

    @app.exception_handler(ValidationError)
    async def invalid_model(request: Request, exc: ValidationError) -> JSONResponse:
        detail = "; ".join(
            f"{'.'.join(str(x) for x in p.get('loc', ()))}: {p.get('msg')}"
            for p in exc.errors()[:5]
        )
        return respond(422, "invalid_request", detail[:2000])

    @app.exception_handler(StarletteHTTPException)
    async def http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
        return respond(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(ClientDisconnect)
    async def left(request: Request, exc: ClientDisconnect) -> Response:
        # The client hung up: not an error of ours, and nobody reads an answer.
        log.info("client left during %s %s", request.method, request.url.path)
        services.metrics.disconnects.inc()
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return respond(500, "internal", "internal error; it has been logged")


def app_from_env() -> Any:
    """Factory for `uvicorn --factory service.app:app_from_env` (settings from the environment)."""
    return create_app(Settings())
