"""What the sync and async clients share: each API call as a value (`Call`: method, path, body,
the response model), the retry policy, and the rules that need no I/O. The two clients differ
only in how they send a `Call` and how they sleep."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Generic, Protocol, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from promptserve.client.errors import APIError, ConflictError
from promptserve.client.images import ImageInput, as_list, to_base64
from service.schemas import (
    ActivateRequest,
    ActivateResponse,
    CheckpointDetail,
    CheckpointList,
    ClassifyRequest,
    ClassifyResponse,
    DeleteResponse,
    EmbedRequest,
    EmbedResponse,
    JobOut,
    UploadResponse,
    VersionList,
)

M = TypeVar("M", bound=BaseModel)
DEFAULT_URL = "http://127.0.0.1:8000"
RETRIED = (429, 503)  # the statuses the server answers with Retry-After: nothing was done


@dataclass(frozen=True)
class Retries:
    """Retries of 429 and 503, honouring `Retry-After` (else exponential back-off). Capped
    three ways: `attempts` in all, no single wait over `max_wait_s` (a longer Retry-After
    gives up at once rather than come back early) and nothing started after `total_s`."""

    attempts: int = 4
    total_s: float = 30.0
    max_wait_s: float = 10.0
    backoff_s: float = 0.5

    def delay(self, attempt: int, error: APIError, elapsed: float) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to raise `error`."""
        if error.status not in RETRIED or attempt >= self.attempts:
            return None
        wait = error.retry_after
        if wait is None:
            wait = self.backoff_s * 2 ** (attempt - 1)
        if wait > self.max_wait_s or elapsed + wait > self.total_s:
            return None
        return wait


@dataclass(frozen=True)
class Call(Generic[M]):
    """One HTTP request and the model its 2xx answer parses into."""

    method: str
    path: str
    model: type[M]
    json: Any = None
    files: Mapping[str, Any] | None = None
    data: Mapping[str, str] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    def request(self) -> dict[str, Any]:
        """Keyword arguments of `httpx.Client.request` (rebuilt for every attempt)."""
        out: dict[str, Any] = {"params": dict(self.params)}
        if self.json is not None:
            out["json"] = self.json
        if self.files is not None:
            out["files"], out["data"] = dict(self.files), dict(self.data or {})
        return out

    def parse(self, response: httpx.Response) -> M:
        return self.model.model_validate(response.json())


def _q(segment: str) -> str:
    return quote(segment, safe="@")  # one path segment; name@version pins stay readable


def headers(api_key: str | None) -> dict[str, str]:
    """The Bearer header; the key defaults to $PROMPTSERVE_API_KEY."""
    key = api_key if api_key is not None else os.environ.get("PROMPTSERVE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def classify(
    images: Any,
    checkpoint: str | None,
    checkpoints: Sequence[str] | None,
    classnames: Sequence[str] | None,
    templates: Sequence[str] | None,
    top_k: int,
) -> Call[ClassifyResponse]:
    req = ClassifyRequest(
        images=to_base64(as_list(images)),
        checkpoint=checkpoint,
        checkpoints=None if checkpoints is None else list(checkpoints),
        classnames=None if classnames is None else list(classnames),
        templates=None if templates is None else list(templates),
        top_k=top_k,
    )
    body = req.model_dump(exclude_none=True)
    return Call("POST", "/v1/classify", ClassifyResponse, json=body)


def embed(
    images: Sequence[ImageInput], texts: Sequence[str], checkpoint: str | None
) -> Call[EmbedResponse]:
    req = EmbedRequest(
        images=to_base64(as_list(images)) if images else [],
        texts=list(texts),
        checkpoint=checkpoint,
    )
    return Call("POST", "/v1/embed", EmbedResponse, json=req.model_dump(exclude_none=True))


class Uploadable(Protocol):
    """An in-memory checkpoint (`service.checkpoints.Checkpoint`): its file is `to_bytes()`."""

    def to_bytes(self) -> bytes: ...


CheckpointInput = str | os.PathLike[str] | bytes | BinaryIO | Uploadable


def upload(checkpoint: CheckpointInput, activate: bool) -> Call[UploadResponse]:
    """A .safetensors checkpoint as a path, its bytes, an open binary file, or a `Checkpoint`."""
    if isinstance(checkpoint, bytes | bytearray):
        name, data = "checkpoint.safetensors", bytes(checkpoint)
    elif hasattr(checkpoint, "to_bytes"):
        name, data = "checkpoint.safetensors", checkpoint.to_bytes()
    elif hasattr(checkpoint, "read"):
        name = os.path.basename(str(getattr(checkpoint, "name", "checkpoint.safetensors")))
        data = checkpoint.read()
    else:
        name = os.path.basename(os.fspath(checkpoint))
        with open(checkpoint, "rb") as f:
            data = f.read()
    files = {"file": (name, data, "application/octet-stream")}
    form = {"activate": "true" if activate else "false"}
    return Call("POST", "/v1/checkpoints", UploadResponse, files=files, data=form)


def activate(name: str, version: int, expected: int | None) -> Call[ActivateResponse]:
    body = ActivateRequest(version=version, expected=expected).model_dump(exclude_none=True)
    return Call("POST", f"/v1/checkpoints/{_q(name)}/activate", ActivateResponse, json=body)


def rollback_target(versions: VersionList, to: int | None) -> tuple[int, int]:
    """(version to activate, expected current): `to`, or the newest version older than the
    current one; compare-and-set on the current pointer, as `promptserve checkpoints rollback`."""
    current = next((v.version for v in versions.versions if v.active), None)
    if to is None:
        older = [v.version for v in versions.versions if current is None or v.version < current]
        if not older:
            raise ConflictError(
                409,
                "conflict",
                f"checkpoint {versions.name!r} has no version older than the current v{current}",
            )
        to = max(older)
    return to, current if current is not None else 0


def versions(name: str) -> Call[VersionList]:
    return Call("GET", f"/v1/checkpoints/{_q(name)}/versions", VersionList)


def checkpoints(q: str | None, limit: int | None, offset: int) -> Call[CheckpointList]:
    given = {"q": q, "limit": limit, "offset": offset or None}
    params = {k: v for k, v in given.items() if v is not None}
    return Call("GET", "/v1/checkpoints", CheckpointList, params=params)


def checkpoint(name: str) -> Call[CheckpointDetail]:
    return Call("GET", f"/v1/checkpoints/{_q(name)}", CheckpointDetail)


def delete(name: str) -> Call[DeleteResponse]:
    return Call("DELETE", f"/v1/checkpoints/{_q(name)}", DeleteResponse)


def submit_job(spec: Mapping[str, Any] | BaseModel | None, fields: dict[str, Any]) -> Call[JobOut]:
    """A training job from a `TrainSpec` (or its dict) and/or keyword fields."""
    body = spec.model_dump() if isinstance(spec, BaseModel) else dict(spec or {})
    return Call("POST", "/v1/jobs", JobOut, json={**body, **fields})


def job(job_id: str) -> Call[JobOut]:
    return Call("GET", f"/v1/jobs/{_q(job_id)}", JobOut)


def cancel_job(job_id: str) -> Call[JobOut]:
    return Call("DELETE", f"/v1/jobs/{_q(job_id)}", JobOut)


DONE = ("finished", "failed", "cancelled")
