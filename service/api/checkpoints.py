"""Checkpoint management: upload, list, show, versions, activate (rollback), delete."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from service import errors
from service.api.deps import AdminAuth, EngineDep, ReadAuth, SettingsDep, StoreDep
from service.api.errors import COMMON, responses
from service.checkpoints.store_errors import store_errors
from service.schemas import (
    ActivateRequest,
    ActivateResponse,
    CheckpointDetail,
    CheckpointList,
    DeleteResponse,
    UploadResponse,
    VersionList,
)

router = APIRouter(tags=["checkpoints"])


async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A store call off the event loop, its errors mapped through the one table."""

    def run() -> Any:
        with store_errors():
            return fn(*args, **kwargs)

    return await asyncio.to_thread(run)


@router.post(
    "/v1/checkpoints",
    status_code=201,
    response_model=UploadResponse,
    responses=responses(*COMMON, 403, 409, 415),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "activate": {"type": "boolean", "default": True},
                        },
                    }
                }
            },
        }
    },
)
async def upload(
    request: Request, _: AdminAuth, engine: EngineDep, settings: SettingsDep
) -> dict[str, Any]:
    """Upload one .safetensors checkpoint (multipart field "file"); its manifest names it."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise errors.UnsupportedMedia("upload a checkpoint as multipart/form-data, field 'file'")
    try:
        form = await request.form(max_files=1, max_fields=5)
    except errors.PromptServeError:
        raise
    except Exception as exc:
        raise errors.BadRequest(f"malformed multipart body: {exc}") from exc
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise errors.BadRequest(
            "multipart field 'file' with the .safetensors checkpoint is missing"
        )
    data = await upload.read(settings.max_checkpoint_bytes + 1)
    activate = str(form.get("activate", "true")).lower() not in ("false", "0", "no")
    published = await engine.publish(data, activate)
    return {
        "name": published.name,
        "version": published.version,
        "method": published.method,
        "active": published.active,
    }


def _version_out(info: Any, current: int | None) -> dict[str, Any]:
    return {
        "version": info.version,
        "size": info.size,
        "sha256": info.sha256,
        "created_at": info.created_at,
        "active": info.version == current,
        "meta": info.meta,
    }


@router.get("/v1/checkpoints", response_model=CheckpointList, responses=responses(*COMMON, 404))
async def list_checkpoints(_: ReadAuth, store: StoreDep) -> dict[str, Any]:
    """Every checkpoint name with its active version."""

    def collect() -> list[dict[str, Any]]:
        out = []
        with store_errors():
            for name in store.names():
                versions = {v.version: v for v in store.versions(name)}
                current = store.current(name)
                meta = versions[current].meta if current in versions else {}
                out.append(
                    {
                        "name": name,
                        "version": current,
                        "method": meta.get("method"),
                        "classes": meta.get("classes"),
                    }
                )
        return out

    return {"checkpoints": await asyncio.to_thread(collect)}


@router.get(
    "/v1/checkpoints/{name}", response_model=CheckpointDetail, responses=responses(*COMMON, 404)
)
async def show(name: str, _: ReadAuth, store: StoreDep, engine: EngineDep) -> dict[str, Any]:
    """One checkpoint: active version, method, class names, and its versions."""
    versions = await _call(store.versions, name)
    current = await _call(store.current, name)
    meta: dict[str, Any] = next((v.meta for v in versions if v.version == current), {})
    classnames = None
    if current is not None:
        try:
            classnames = list(await engine.labels(f"{name}@{current}"))
        except errors.PromptServeError:
            classnames = None  # the listing still answers for a damaged version
    return {
        "name": name,
        "version": current,
        "method": meta.get("method"),
        "classes": meta.get("classes"),
        "classnames": classnames,
        "dropped": meta.get("dropped"),
        "conversation": meta.get("conversation"),
        "versions": [_version_out(v, current) for v in versions],
    }


@router.get(
    "/v1/checkpoints/{name}/versions", response_model=VersionList, responses=responses(*COMMON, 404)
)
async def versions(name: str, _: ReadAuth, store: StoreDep) -> dict[str, Any]:
    """Every stored version of a checkpoint, oldest first."""
    infos = await _call(store.versions, name)
    current = await _call(store.current, name)
    return {"name": name, "versions": [_version_out(v, current) for v in infos]}


@router.post(
    "/v1/checkpoints/{name}/activate",
    response_model=ActivateResponse,
    responses=responses(*COMMON, 403, 404, 409),
)
async def activate(
    name: str, req: ActivateRequest, _: AdminAuth, store: StoreDep
) -> dict[str, Any]:
    """Make a stored version current (rollback included); `expected` makes it compare-and-set."""
    version = await _call(store.activate, name, req.version, req.expected)
    return {"name": name, "version": version, "active": True}


@router.delete(
    "/v1/checkpoints/{name}", response_model=DeleteResponse, responses=responses(*COMMON, 403, 404)
)
async def delete(name: str, _: AdminAuth, store: StoreDep, engine: EngineDep) -> dict[str, Any]:
    """Delete every version of a checkpoint."""
    await _call(store.versions, name)  # 404 for an unknown name rather than a silent no-op
    await _call(store.delete, name)
    engine.forget(name)  # this replica at once; the others through the store's event
    return {"name": name, "deleted": True}
