"""Training jobs over HTTP: submit (admin), read (read key), cancel (admin). The work is done by a
separate `promptserve worker`; this router only talks to the queue."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Response

from service.api.deps import AdminAuth, JobsDep, ReadAuth
from service.api.errors import COMMON, responses
from service.schemas import JobOut
from service.training.runs import TrainSpec

router = APIRouter(tags=["jobs"])


_OUT: dict[str, Any] = {"response_model": JobOut, "response_model_exclude_none": True}
_RESPONSES = responses(*COMMON, 403, 404, 409)


@router.post("/v1/jobs", status_code=202, responses=_RESPONSES, **_OUT)
async def submit(
    spec: TrainSpec, response: Response, _: AdminAuth, jobs: JobsDep
) -> dict[str, Any]:
    """Queue a training run; a `promptserve worker` picks it up."""
    job_id = await asyncio.to_thread(jobs.submit, spec)
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return {"id": job_id, "state": "queued"}


@router.get("/v1/jobs/{job_id}", responses=_RESPONSES, **_OUT)
async def show(job_id: str, _: ReadAuth, jobs: JobsDep) -> dict[str, Any]:
    """State; progress while it runs, result when finished, error when failed."""
    return await asyncio.to_thread(jobs.status, job_id)


@router.delete("/v1/jobs/{job_id}", responses=_RESPONSES, **_OUT)
async def cancel(job_id: str, response: Response, _: AdminAuth, jobs: JobsDep) -> dict[str, Any]:
    """Cancel: a queued job is cancelled at once (200); a running one stops at its next batch
    and publishes nothing (202, state "started" with cancel_requested until it has stopped)."""
    out = await asyncio.to_thread(jobs.cancel, job_id)
    response.status_code = 202 if out["state"] == "started" else 200
    return out
