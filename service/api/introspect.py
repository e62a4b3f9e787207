"""Who is asking and what is loaded: the facts a console (or any client) needs to decide what to
offer, read through the same auth as every other route."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service.api.deps import EngineDep, ReadAuth, SettingsDep
from service.api.errors import COMMON, responses
from service.prompts.registry import trainable
from service.training import proving_ground as pg
from service.training.datasets import KINDS
from service.training.recipes import PROVING_CONFIG, PROVING_RECIPE

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


@router.get("/v1/whoami", response_model=WhoAmI, responses=responses(*COMMON))
async def whoami(settings: SettingsDep, role: ReadAuth) -> dict[str, Any]:
    """The role of the key sent (401 for none or an unknown one while auth is on)."""
    return {"role": role, "auth": settings.auth_enabled}


@router.get("/v1/residency", response_model=ResidencyOut, responses=responses(*COMMON))
async def residency(_: ReadAuth, engine: EngineDep) -> dict[str, Any]:
    """What the engine holds in memory and what it may hold."""
    return await engine.residents()


@router.get("/v1/training/options", response_model=TrainingOptions, responses=responses(*COMMON))
async def training_options(_: ReadAuth, engine: EngineDep) -> dict[str, Any]:
    """The methods, dataset kinds and proving-ground domains a training job for the served
    backbone may name."""
    task = "classify" if "classify" in engine.capabilities else "answer"
    return {
        "methods": trainable(task),
        "datasets": list(KINDS[task]),
        "proving_ground": {
            "domains": list(pg.DOMAINS),  # as the module orders them: source first
            "recipe": PROVING_RECIPE,
            "method_config": PROVING_CONFIG,
        },
    }
