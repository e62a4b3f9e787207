"""Checkpoint management: upload, list, show, versions, activate (rollback), delete."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from starlette.datastructures import UploadFile

import prompts_store as ps
from service import errors
from service.api.deps import AdminAuth, EngineDep, ReadAuth, SettingsDep, StoreDep
from service.api.errors import COMMON, responses
from service.checkpoints.format import parse
from service.checkpoints.store_errors import store_errors
from service.schemas import (
    ActivateRequest,
    ActivateResponse,
    CheckpointDetail,
    CheckpointList,
    DeleteResponse,
    UploadResponse,
    VersionDetail,
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
async def list_checkpoints(
    _: ReadAuth,
    store: StoreDep,
    q: Annotated[str | None, Query(max_length=64, description="part of the name")] = None,
    limit: Annotated[int | None, Query(ge=1, le=1000, description="page size")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """Checkpoint names with their active version: all of them, or one page of those whose name
    contains `q` (case-insensitive), in name order."""

    def collect() -> dict[str, Any]:
        with store_errors():
            # Names alone are one cheap call in both stores (a directory listing, one SMEMBERS);
            # the per-name reads below are the expensive part, so they are done for the page only.
            names = store.names()
            if q:
                needle = q.casefold()
                names = [n for n in names if needle in n.casefold()]
            page = names[offset : None if limit is None else offset + limit]
            out = []
            for name in page:
                try:
                    versions = {v.version: v for v in store.versions(name)}
                    current = store.current(name)
                except ps.NotFound:
                    continue  # deleted since the listing
                meta = versions[current].meta if current in versions else {}
                out.append(
                    {
                        "name": name,
                        "version": current,
                        "method": meta.get("method"),
                        "classes": meta.get("classes"),
                    }
                )
        return {"checkpoints": out, "total": len(names), "offset": offset, "limit": limit}

    return await asyncio.to_thread(collect)


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


@router.get(
    "/v1/checkpoints/{name}/versions/{version}",
    response_model=VersionDetail,
    responses=responses(*COMMON, 404),
)
async def version_detail(
    name: str,
    version: Annotated[int, Path(ge=1)],
    _: ReadAuth,
    store: StoreDep,
    settings: SettingsDep,
) -> dict[str, Any]:
    """One stored version with its manifest and the shapes and count of its trained tensors."""
    stored = await _call(store.get, name, version)  # checksum verified; 404 names the versions
    current = await _call(store.current, name)
    ckpt = await asyncio.to_thread(parse, stored.data, settings.max_checkpoint_bytes)
    return {
        **_version_out(stored, current),
        "name": name,
        "manifest": ckpt.manifest.model_dump(),
        "tensors": {k: list(t.shape) for k, t in ckpt.params.items()},
        "parameters": sum(t.numel() for t in ckpt.params.values()),
    }


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
