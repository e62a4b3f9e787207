"""`AsyncClient`: the asyncio client (httpx.AsyncClient underneath), the same calls as `Client`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from promptserve.client import calls
from promptserve.client.calls import DEFAULT_URL, Call, CheckpointInput, Retries
from promptserve.client.errors import APIConnectionError, JobTimeout, from_response
from promptserve.client.images import ImageInput
from service.schemas import (
    ActivateResponse,
    CheckpointDetail,
    CheckpointList,
    ClassifyResponse,
    DeleteResponse,
    EmbedResponse,
    JobOut,
    UploadResponse,
    VersionList,
)

M = TypeVar("M", bound=BaseModel)


class AsyncClient:
    """promptserve over HTTP for asyncio, as `Client`: typed results (the server's own response
    models), images from paths, bytes, PIL images or arrays, retries of 429/503 honouring
    Retry-After, and errors raised as `APIError` subclasses carrying the API's code and status.

        async with AsyncClient("http://127.0.0.1:8000", api_key="...") as c:
            (await c.classify(["cat.png"], checkpoint="pets")).results[0].predictions[0][0]
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: Retries | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.retries = retries or Retries()
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=calls.headers(api_key),
            timeout=timeout,
            transport=transport,
        )
        self.jobs = AsyncJobs(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def send(self, call: Call[M]) -> M:
        """One call, retried on 429/503 as `self.retries` allows; its parsed answer."""
        start, attempt = time.monotonic(), 0
        while True:
            attempt += 1
            try:
                response = await self._http.request(call.method, call.path, **call.request())
            except httpx.TransportError as exc:
                raise APIConnectionError(f"{call.method} {call.path}: {exc!r}") from exc
            if response.is_success:
                return call.parse(response)
            error = from_response(response)
            wait = self.retries.delay(attempt, error, time.monotonic() - start)
            if wait is None:
                raise error
            await asyncio.sleep(wait)

    async def classify(
        self,
        images: Any,
        *,
        checkpoint: str | None = None,
        checkpoints: Sequence[str] | None = None,
        classnames: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        top_k: int = 5,
    ) -> ClassifyResponse:
        """Classify images under one checkpoint (`name` or `name@version`), several, or ad-hoc
        `classnames` (+ `templates`, zero-shot): one result per checkpoint, one list per image."""
        # reading and encoding images is blocking work: off the event loop
        call = await asyncio.to_thread(
            calls.classify, images, checkpoint, checkpoints, classnames, templates, top_k
        )
        return await self.send(call)

    async def embed(
        self,
        images: Sequence[ImageInput] = (),
        *,
        texts: Sequence[str] = (),
        checkpoint: str | None = None,
    ) -> EmbedResponse:
        """Normalized image embeddings (under `checkpoint`'s vision prompts if given), texts'."""
        return await self.send(await asyncio.to_thread(calls.embed, images, texts, checkpoint))

    async def upload(self, checkpoint: CheckpointInput, *, activate: bool = True) -> UploadResponse:
        """Upload a .safetensors checkpoint (a path, its bytes, an open binary file, or an
        in-memory `Checkpoint`); admin key."""
        return await self.send(await asyncio.to_thread(calls.upload, checkpoint, activate))

    async def activate(
        self, name: str, version: int, expected: int | None = None
    ) -> ActivateResponse:
        """Make `version` current; with `expected`, only if the current one is `expected`
        (else `ConflictError`)."""
        return await self.send(calls.activate(name, version, expected))

    async def rollback(self, name: str, *, to: int | None = None) -> ActivateResponse:
        """Back to `to`, or to the newest version older than the current one, compare-and-set:
        a change that lands in between raises `ConflictError` instead of being undone."""
        version, expected = calls.rollback_target(await self.versions(name), to)
        return await self.activate(name, version, expected=expected)

    async def versions(self, name: str) -> VersionList:
        return await self.send(calls.versions(name))

    async def checkpoints(
        self, q: str | None = None, *, limit: int | None = None, offset: int = 0
    ) -> CheckpointList:
        """Checkpoint names and their active versions: all, or a page (`limit`, `offset`) of
        those whose name contains `q`; `.total` counts every match."""
        return await self.send(calls.checkpoints(q, limit, offset))

    async def checkpoint(self, name: str) -> CheckpointDetail:
        return await self.send(calls.checkpoint(name))

    async def delete(self, name: str) -> DeleteResponse:
        return await self.send(calls.delete(name))


class AsyncJobs:
    """Training jobs: `await client.jobs.submit(...)`, `.get`, `.cancel`, `.wait`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def submit(
        self, spec: Mapping[str, Any] | BaseModel | None = None, **fields: Any
    ) -> JobOut:
        """Queue a run: a `TrainSpec` or its dict, and/or its fields as keywords; admin key."""
        return await self._client.send(calls.submit_job(spec, fields))

    async def get(self, job_id: str) -> JobOut:
        return await self._client.send(calls.job(job_id))

    async def cancel(self, job_id: str) -> JobOut:
        return await self._client.send(calls.cancel_job(job_id))

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float = 3600.0,
        poll_s: float = 0.5,
        on_progress: Callable[[JobOut], None] | None = None,
    ) -> JobOut:
        """Poll until the job is finished, failed or cancelled (returned as such); `JobTimeout`
        after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (job := await self.get(job_id)).state not in calls.DONE:
            if on_progress is not None:
                on_progress(job)
            if time.monotonic() >= deadline:
                raise JobTimeout(f"job {job_id} still {job.state} after {timeout:g} s")
            await asyncio.sleep(poll_s)
        return job
