"""What routes get injected: the wired services and the caller's authorization."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Annotated, Literal

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

import prompts_store as ps
from service import errors
from service.backbones.clip import ClipBackbone
from service.backbones.llava import LlavaBackbone
from service.engine.inference import Inference
from service.engine.residency import Residency
from service.metrics import Metrics
from service.settings import Settings
from service.training.jobs import JobQueue
from service.training.local_jobs import LocalJobs


@dataclass
class Services:
    """Everything the lifespan wires once; routes reach it through `get_services`."""

    settings: Settings
    metrics: Metrics
    backbone: ClipBackbone | LlavaBackbone | None = None
    store: ps.PromptStore | None = None
    residency: Residency | None = None
    inference: Inference | None = None
    jobs: JobQueue | LocalJobs | None = None
    ready: bool = False
    status: dict[str, str] = field(default_factory=dict)

    def require(self) -> Inference:
        """The classification pipeline (CLIP); a LLaVA server says so instead of "starting"."""
        if self.ready and self.inference is None and isinstance(self.backbone, LlavaBackbone):
            raise errors.WrongBackbone(
                f"this service serves a LLaVA backbone ({self.backbone.model_name}); "
                "classification and embeddings need a CLIP backbone (--backbone clip). "
                "Ask it with POST /v1/answer or /v1/chat/completions"
            )
        if not self.ready or self.inference is None:
            raise errors.NotReady("the service is starting or stopping; retry shortly")
        return self.inference

    def require_store(self) -> ps.PromptStore:
        """The checkpoint store, on either backbone (uploads validate against the one loaded)."""
        if not self.ready or self.store is None or self.backbone is None:
            raise errors.NotReady("the service is starting or stopping; retry shortly")
        return self.store


# The dependencies are `async def` on purpose: FastAPI runs plain `def` dependencies in the
# thread pool, where image decoding also runs, so under a crowd even the 429 (decided after
# auth) waited seconds for a free thread. None of them blocks.
async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
_bearer = HTTPBearer(auto_error=False)
Role = Literal["read", "admin"]


def _role(settings: Settings, creds: HTTPAuthorizationCredentials | None) -> Role:
    if not settings.auth_enabled:
        return "admin"  # no keys: loopback-only service (enforced at bind time)
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise errors.Unauthorized("missing API key: send Authorization: Bearer <key>")
    key = creds.credentials.encode()
    # compare_digest per key: no early exit that would leak which prefix matched
    if any(hmac.compare_digest(key, k.encode()) for k in settings.admin_key_set()):
        return "admin"
    if any(hmac.compare_digest(key, k.encode()) for k in settings.read_keys()):
        return "read"
    raise errors.Unauthorized("unknown API key")


async def require_read(
    services: ServicesDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Role:
    return _role(services.settings, creds)


async def require_admin(
    services: ServicesDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Role:
    role = _role(services.settings, creds)
    if role != "admin":
        raise errors.Forbidden("this route needs an admin key")
    return role


async def ops_viewer(
    services: ServicesDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Role | None:
    """Who may see operational details: a key holder, or anyone when metrics are public or no
    keys are configured (loopback only); None for an anonymous caller. A wrong key is a 401."""
    settings = services.settings
    if settings.metrics_public or not settings.auth_enabled:
        return "read"
    if creds is None:
        return None
    return _role(settings, creds)


ReadAuth = Annotated[Role, Depends(require_read)]
OpsViewer = Annotated[Role | None, Depends(ops_viewer)]
AdminAuth = Annotated[Role, Depends(require_admin)]
