"""What routes get injected (typed `Annotated` dependencies): the settings, the metrics, the
engine (through `EngineClient`, or the generation path), the store, the jobs, the front end, and
the caller's authorization.

The lifespan (service/app.py) puts what it built on `app.state`; these functions are the only
code that reads it. The engine parts are there only while the service is ready: a request
before (or during shutdown) is a 503, a request for a capability the served backbone lacks a
404 `wrong_backbone` saying which backbone serves it.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Literal

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

import prompts_store as ps
from service import errors
from service.api.frontend import FrontEnd
from service.backbones.base import Capability
from service.backbones.registry import kind, serving
from service.engine.answering import Generation
from service.engine.core import Engine
from service.engine.protocol import EngineClient
from service.metrics import Metrics
from service.settings import Settings
from service.training.jobs import JobQueue
from service.training.local_jobs import LocalJobs

STARTING = "the service is starting or stopping; retry shortly"
# What each capability serves, to tell a client of the other backbone kind where to go.
SERVES: dict[Capability, str] = {
    "classify": "classification and embeddings (POST /v1/classify, /v1/embed)",
    "embed": "classification and embeddings (POST /v1/classify, /v1/embed)",
    "answer": "instruction answering (POST /v1/answer, /v1/chat/completions)",
}


def wrong_backbone(engine: EngineClient, capability: Capability) -> errors.WrongBackbone:
    """The 404 of a route whose capability the served backbone lacks: what serves it instead."""
    served = engine.describe()
    title = kind(served["kind"]).cls.title
    need = " or ".join(f"a {k.title} backbone (--backbone {k.kind})" for k in serving(capability))
    here = "; ".join(dict.fromkeys(SERVES[c] for c in sorted(engine.capabilities)))
    return errors.WrongBackbone(
        f"this service serves a {title} backbone ({served['backbone']}); "
        f"{SERVES[capability]} needs {need}. It serves {here}"
    )


# The dependencies are `async def` on purpose: FastAPI runs plain `def` dependencies in the
# thread pool, where image decoding also runs, so under a crowd even the 429 (decided after
# auth) waited seconds for a free thread. None of them blocks.
async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def get_engine(request: Request) -> EngineClient:
    """The running engine (in process, or the engine process), or 503 while starting, stopping
    or (with several front ends) while the engine process restarts."""
    engine: EngineClient | None = request.app.state.engine
    if engine is None or not engine.ready:
        raise errors.NotReady(STARTING)
    return engine


async def maybe_engine(request: Request) -> EngineClient | None:
    """The engine when ready, else None (/readyz and /metrics answer either way)."""
    engine: EngineClient | None = request.app.state.engine
    return engine if engine is not None and engine.ready else None


EngineDep = Annotated[EngineClient, Depends(get_engine)]


async def get_classifier(engine: EngineDep) -> EngineClient:
    """The engine, for a route of the classify capability (404 on a backbone without it)."""
    if "classify" not in engine.capabilities:
        raise wrong_backbone(engine, "classify")
    return engine


async def get_generation(engine: EngineDep) -> Generation:
    """The generation path, for a route of the answer capability (404 on one without it).
    It runs in the process that serves the route (LLaVA is served by one process)."""
    if not isinstance(engine, Engine) or engine.generation is None:
        raise wrong_backbone(engine, "answer")
    return engine.generation


async def get_frontend(request: Request, _: Annotated[EngineClient, Depends(get_classifier)]
                       ) -> FrontEnd:  # fmt: skip
    frontend: FrontEnd = request.app.state.frontend
    return frontend


async def get_store(request: Request, _: EngineDep) -> ps.PromptStore:
    """The checkpoint store (on either backbone: uploads validate against the one served)."""
    store: ps.PromptStore = request.app.state.store
    return store


async def get_jobs(request: Request) -> JobQueue | LocalJobs:
    jobs: JobQueue | LocalJobs | None = request.app.state.jobs
    if jobs is None:
        raise errors.NotReady(
            "training jobs are off: set PROMPTSERVE_QUEUE=redis://... (workers) or "
            "PROMPTSERVE_LOCAL_JOBS=true (the service trains them itself)"
        )
    return jobs


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
MaybeEngineDep = Annotated[EngineClient | None, Depends(maybe_engine)]
ClassifierDep = Annotated[EngineClient, Depends(get_classifier)]
GenerationDep = Annotated[Generation, Depends(get_generation)]
FrontEndDep = Annotated[FrontEnd, Depends(get_frontend)]
StoreDep = Annotated[ps.PromptStore, Depends(get_store)]
JobsDep = Annotated[JobQueue | LocalJobs, Depends(get_jobs)]

# --- authorization -------------------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False)
Role = Literal["read", "admin"]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


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


async def require_read(settings: SettingsDep, creds: Credentials) -> Role:
    return _role(settings, creds)


async def require_admin(settings: SettingsDep, creds: Credentials) -> Role:
    role = _role(settings, creds)
    if role != "admin":
        raise errors.Forbidden("this route needs an admin key")
    return role


async def ops_viewer(settings: SettingsDep, creds: Credentials) -> Role | None:
    """Who may see operational details: a key holder, or anyone when metrics are public or no
    keys are configured (loopback only); None for an anonymous caller. A wrong key is a 401."""
    if settings.metrics_public or not settings.auth_enabled:
        return "read"
    if creds is None:
        return None
    return _role(settings, creds)


ReadAuth = Annotated[Role, Depends(require_read)]
OpsViewer = Annotated[Role | None, Depends(ops_viewer)]
AdminAuth = Annotated[Role, Depends(require_admin)]
