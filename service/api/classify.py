"""POST /v1/classify and POST /v1/embed."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from service import errors, jsonsafe
from service.api.deps import ReadAuth, ServicesDep
from service.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    ErrorResponse,
)

router = APIRouter(tags=["inference"])
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 429, 503, 504)
}


async def _multipart(request: Request, max_images: int) -> tuple[list[bytes], dict[str, Any]]:
    """Files under "images" (or "file"), and form fields for the rest of the request."""
    try:
        form = await request.form(max_files=max_images + 1, max_fields=200)
    except errors.PromptServeError:
        raise
    except Exception as exc:
        if "Too many files" in str(exc):  # starlette's parser stops at max_files: same as JSON
            raise errors.TooManyImages(
                f"more than {max_images} images; at most {max_images} per request"
            ) from exc
        raise errors.BadRequest(f"malformed multipart body: {exc}") from exc
    files: list[bytes] = []
    fields: dict[str, list[str]] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key not in ("images", "image", "file", "files"):
                raise errors.BadRequest(f"unexpected file field {key!r}; use 'images'")
            files.append(await value.read())
        else:
            fields.setdefault(key, []).append(value)
    out: dict[str, Any] = {}
    for key, values in fields.items():
        if key in ("checkpoints", "classnames", "templates"):
            out[key] = [v for raw in values for v in _form_list(key, raw)]
        elif key == "top_k":
            out[key] = int(values[0]) if values[0].isdigit() else values[0]
        else:
            out[key] = values[0]
    return files, out


def _form_list(key: str, raw: str) -> list[Any]:
    """A list-valued form field: a JSON array (`["a", "b"]`) or comma-separated text."""
    if not raw.startswith("["):
        return raw.split(",")
    value = jsonsafe.loads(raw, f"form field {key!r}")
    if not isinstance(value, list):
        raise errors.BadRequest(f"form field {key!r} must be a JSON array of strings")
    return value


async def _body(request: Request, max_images: int) -> tuple[list[str | bytes], dict[str, Any]]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        files, fields = await _multipart(request, max_images)
        return list(files), fields
    if ctype not in ("application/json", ""):
        raise errors.UnsupportedMedia(
            f"content type {ctype!r}; send application/json or multipart/form-data"
        )
    payload = jsonsafe.loads(await request.body())
    if not isinstance(payload, dict):
        raise errors.BadRequest("body must be a JSON object")
    images = payload.get("images")
    if isinstance(images, list) and len(images) > max_images:
        raise errors.TooManyImages(f"{len(images)} images; at most {max_images} per request")
    return [], payload


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    responses=ERRORS,
    # The handler reads the body itself (JSON or multipart), so FastAPI would not document it: the
    # model's schema is inlined here (a bare $ref pointed at a component that was never emitted).
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ClassifyRequest.model_json_schema()}},
        }
    },
)
async def classify(request: Request, services: ServicesDep, _: ReadAuth) -> dict[str, Any]:
    """Classify images by checkpoint(s), or zero-shot with ad-hoc class names."""
    inference = services.require()
    start = time.perf_counter()
    deadline = inference.deadline()  # from arrival: text encoding and decoding count too
    # The body has arrived (middleware.BodyReader): admission counts only complete requests.
    with inference.admission():  # 429 at once when full, before the body is parsed
        files, fields = await _body(request, inference.max_images)
        req = ClassifyRequest.model_validate({"images": [], **fields})
        items: list[str | bytes] = [*req.images, *files]
        inference.check_count(len(items))
        targets = await inference.targets(
            req.checkpoint, req.checkpoints, req.classnames, req.templates, deadline
        )
        results = await inference.classify(items, targets, req.top_k, deadline)
    services.metrics.latency.labels("classify").observe(time.perf_counter() - start)
    return {"results": results}


@router.post("/v1/embed", response_model=EmbedResponse, responses=ERRORS)
async def embed(req: EmbedRequest, services: ServicesDep, _: ReadAuth) -> dict[str, Any]:
    """Normalized image embeddings (plain or under a checkpoint's vision prompts) and texts."""
    inference = services.require()
    if not req.images and not req.texts:
        raise errors.BadRequest("give images, texts, or both")
    start = time.perf_counter()
    checkpoint = version = plan = None
    if req.checkpoint is not None:
        resident = await asyncio.to_thread(inference.residency.resolve, req.checkpoint)
        checkpoint, version, plan = resident.name, resident.version, resident.plan
    images = await inference.embed_images(req.images, plan) if req.images else None
    texts = await inference.embed_texts(req.texts) if req.texts else None
    services.metrics.latency.labels("embed").observe(time.perf_counter() - start)
    return {
        "checkpoint": checkpoint,
        "version": version,
        "image_embeddings": [] if images is None else images.tolist(),
        "text_embeddings": [] if texts is None else texts.tolist(),
    }
