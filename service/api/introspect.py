"""Who is asking and what is loaded: the facts a console (or any client) needs to decide what to
offer, read through the same auth as every other route."""

from __future__ import annotations

import asyncio
from typing import Any, Literal, get_args

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service import errors
from service.api.classify import ERRORS
from service.api.deps import ReadAuth, ServicesDep
from service.training import proving_ground as pg
from service.training.recipes import PROVING_CONFIG, PROVING_RECIPE, RECIPES
from service.training.runs import DatasetSpec

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


class ProvingGroundOptions(BaseModel):
    domains: list[str] = Field(description="the generated domains a job may train on")
    recipe: dict[str, Any] = Field(description="the short recipe the small backbone trains with")
    method_config: dict[str, dict[str, Any]] = Field(description="method -> config it needs")


class TrainingOptions(BaseModel):
    """What POST /v1/jobs accepts, for a form to offer (a client may send any of it)."""

    methods: list[str] = Field(description="prompt methods with something to train")
    datasets: list[str] = Field(description="dataset kinds")
    proving_ground: ProvingGroundOptions


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


@router.get("/v1/training/options", response_model=TrainingOptions, responses=ERRORS)
async def training_options(_: ReadAuth) -> dict[str, Any]:
    """The methods, dataset kinds and proving-ground domains a training job may name."""
    return {
        "methods": sorted(RECIPES),
        "datasets": list(get_args(DatasetSpec.model_fields["kind"].annotation)),
        "proving_ground": {
            "domains": list(pg.DOMAINS),  # as the module orders them: source first
            "recipe": PROVING_RECIPE,
            "method_config": PROVING_CONFIG,
        },
    }
