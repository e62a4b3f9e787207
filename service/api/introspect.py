"""Who is asking and what is loaded: the facts a console (or any client) needs to decide what to
offer, read through the same auth as every other route."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service import errors
from service.api.classify import ERRORS
from service.api.deps import ReadAuth, ServicesDep

router = APIRouter(tags=["operations"])


class WhoAmI(BaseModel):
    role: Literal["read", "admin"] = Field(description="what the presented key may do")
    auth: bool = Field(description="false: the service has no keys (loopback only); all is admin")


class ResidentOut(BaseModel):
    name: str
    version: int
    method: str
    tier: Literal["device", "host"]
    bytes: int


class ResidencyOut(BaseModel):
    """Checkpoint versions held in memory, per tier, most recently used first."""

    device: str
    device_budget_bytes: int
    device_bytes: int
    host_budget_bytes: int
    host_bytes: int
    residents: list[ResidentOut]
    serving: dict[str, int] = Field(description="name -> version this replica serves")


@router.get("/v1/whoami", response_model=WhoAmI, responses=ERRORS)
async def whoami(services: ServicesDep, role: ReadAuth) -> dict[str, Any]:
    """The role of the key sent (401 for none or an unknown one while auth is on)."""
    return {"role": role, "auth": services.settings.auth_enabled}


@router.get("/v1/residency", response_model=ResidencyOut, responses=ERRORS)
async def residency(services: ServicesDep, _: ReadAuth) -> dict[str, Any]:
    """What this replica holds in memory and what it may hold."""
    if services.residency is None:
        raise errors.NotReady("the service is starting or stopping; retry shortly")
    return await asyncio.to_thread(services.residency.residents)
