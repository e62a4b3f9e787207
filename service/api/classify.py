"""POST /v1/classify and POST /v1/embed."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from service import errors, jsonsafe
from service.api.deps import ClassifierDep, FrontEndDep, MetricsDep, ReadAuth
from service.api.errors import COMMON, responses
from service.engine.protocol import AdHoc, ClassifyResult, ClassifyWork, EmbedWork, Images
from service.schemas import ClassifyRequest, ClassifyResponse, EmbedRequest, EmbedResponse

router = APIRouter(tags=["inference"])


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


async def _body(request: Request, max_images: int) -> tuple[list[bytes], dict[str, Any]]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _multipart(request, max_images)
    if ctype not in ("application/json", ""):
        raise errors.UnsupportedMedia(
            f"content type {ctype!r}; send application/json or multipart/form-data"
        )
    payload = jsonsafe.loads(await request.body())
    if not isinstance(payload, dict):
        raise errors.BadRequest("body must be a JSON object")
    return [], payload


def _work(req: ClassifyRequest, images: Images, deadline: float, request_id: str) -> ClassifyWork:
    """Exactly one way of naming classifiers -> the engine's work."""
    given = [x is not None for x in (req.checkpoint, req.checkpoints, req.classnames)]
    if sum(given) != 1:
        raise errors.BadRequest("give exactly one of checkpoint, checkpoints, classnames")
    adhoc = None
    if req.classnames is not None:
        templates = None if req.templates is None else tuple(req.templates)
        adhoc = AdHoc(tuple(req.classnames), templates)
    elif req.templates is not None:
        raise errors.BadRequest("templates go with classnames (ad-hoc zero-shot) only")
    refs = (req.checkpoint,) if req.checkpoint is not None else tuple(req.checkpoints or ())
    if adhoc is None and not refs:
        raise errors.BadRequest("checkpoints is empty; name at least one")
    return ClassifyWork(request_id, refs, adhoc, images, req.top_k, deadline)


def _result(r: ClassifyResult) -> dict[str, Any]:
    return {
        "checkpoint": r.checkpoint,
        "version": r.version,
        "method": r.method,
        "predictions": [[{"label": lab, "score": s} for lab, s in row] for row in r.predictions],
    }


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    responses=responses(*COMMON, 404, 415, 504),
    # The handler reads the body itself (JSON or multipart), so FastAPI would not document it: the
    # model's schema is inlined here (a bare $ref pointed at a component that was never emitted).
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ClassifyRequest.model_json_schema()}},
        }
    },
)
async def classify(
    request: Request, _: ReadAuth, engine: ClassifierDep, front: FrontEndDep, metrics: MetricsDep
) -> dict[str, Any]:
    """Classify images by checkpoint(s), or zero-shot with ad-hoc class names."""
    start = time.perf_counter()
    deadline = front.deadline()  # from arrival: text encoding and decoding count too
    # The body has arrived (middleware.BodyReader): admission counts only complete requests.
    with front.admission():  # 429 at once when full, before the body is parsed
        files, fields = await _body(request, front.max_images)
        req = ClassifyRequest.model_validate({"images": [], **fields})
        items: list[str | bytes] = [*req.images, *files]
        front.check_count(len(items))
        work = _work(req, (), deadline, request.state.request_id)
        if work.adhoc is not None:  # validate the class names before decoding anything
            front.check_adhoc(work.adhoc)
        images = await asyncio.to_thread(front.decode, items)
        results = await engine.classify(replace(work, images=images))
    metrics.latency.labels("classify").observe(time.perf_counter() - start)
    return {"results": [_result(r) for r in results]}


@router.post("/v1/embed", response_model=EmbedResponse, responses=responses(*COMMON, 404, 415, 504))
async def embed(
    req: EmbedRequest,
    request: Request,
    _: ReadAuth,
    engine: ClassifierDep,
    front: FrontEndDep,
    metrics: MetricsDep,
) -> dict[str, Any]:
    """Normalized image embeddings (plain or under a checkpoint's vision prompts) and texts."""
    if not req.images and not req.texts:
        raise errors.BadRequest("give images, texts, or both")
    start = time.perf_counter()
    deadline = front.deadline()
    front.check_texts(req.texts)
    images = None
    if req.images:
        front.check_count(len(req.images))
        images = await asyncio.to_thread(front.decode, req.images)
    work = EmbedWork(request.state.request_id, req.checkpoint, images, tuple(req.texts), deadline)
    out = await engine.embed(work)
    metrics.latency.labels("embed").observe(time.perf_counter() - start)
    return {
        "checkpoint": out.checkpoint,
        "version": out.version,
        "image_embeddings": [] if out.images is None else out.images.tolist(),
        "text_embeddings": [] if out.texts is None else out.texts.tolist(),
    }
