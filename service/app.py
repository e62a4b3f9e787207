"""create_app(settings): the FastAPI application and the lifespan that wires its parts.

The lifespan loads the backbone once, opens the store, starts the engine (residency and the
paths the backbone's capabilities call for, warmed up) and the jobs, and only then reports
ready. No module globals: what routes need is on `app.state`, read only by service/api/deps.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

from fastapi import FastAPI

import prompts_store as ps
from prompts_store import open_store
from service import __version__
from service.api import answer, checkpoints, classify, errors, introspect, jobs, ops
from service.api.frontend import FrontEnd
from service.backbones.base import Backbone
from service.backbones.registry import load_backbone
from service.engine.control import ControlBlock
from service.engine.core import start_engine
from service.engine.protocol import EngineClient
from service.logs import RequestLog, redact_url
from service.metrics import Metrics
from service.middleware import BodyReader, RequestId
from service.settings import Settings
from service.training.local_jobs import jobs_for
from service.ui import routes as console

log = logging.getLogger(__name__)
UPLOAD_FRAMING = 64 * 2**10  # multipart boundary and part headers around an uploaded file


class Remote(Protocol):
    """How a front-end process of `--frontends N` reaches the engine (service/split.py)."""

    index: int
    control: ControlBlock

    def connect(self) -> AbstractAsyncContextManager[EngineClient]: ...


def create_app(
    settings: Settings, backbone: Backbone | None = None, frontend: Remote | None = None
) -> FastAPI:
    """The application; `backbone` may be injected (tests) instead of loaded from settings.
    With `frontend`, this process is front end number `frontend.index` of `--frontends N`: its
    engine is the engine process, reached through `frontend.connect()`."""

    def engine_of(store: ps.PromptStore) -> AbstractAsyncContextManager[EngineClient]:
        if frontend is not None:
            return frontend.connect()
        bb = backbone if backbone is not None else load_backbone(settings)
        return start_engine(settings, bb, store, metrics.batch_size.observe)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store = store = open_store(settings.store)
        app.state.jobs = jobs_for(settings)
        try:
            async with engine_of(store) as engine:
                if "classify" in engine.capabilities:
                    board = frontend.control if frontend is not None else None
                    index = frontend.index if frontend is not None else 0
                    app.state.frontend = FrontEnd.of(settings, engine, board, index)
                app.state.engine = engine  # ready: the routes' dependencies now answer
                _log_ready(settings, engine)
                try:
                    yield
                finally:
                    app.state.engine = None  # stopping: new requests get 503
        finally:
            if app.state.jobs is not None:
                app.state.jobs.close()
            store.close()

    metrics = Metrics(lambda: _live(app.state.engine, app.state.frontend))
    app = FastAPI(title="promptserve", version=__version__, lifespan=lifespan)
    app.state.settings, app.state.metrics = settings, metrics
    app.state.engine = app.state.frontend = app.state.store = app.state.jobs = None
    for module in (classify, answer, checkpoints, jobs, ops, introspect):
        app.include_router(module.router)
    console.install(app)  # /ui (the web console) and / leading to it
    errors.install(app, metrics)
    app.add_middleware(
        BodyReader,
        limit=settings.max_body_bytes,
        # a checkpoint upload is bounded by the checkpoint limit instead (an M²PT checkpoint with
        # a 7B output head is ~275 MB), with room for the multipart framing around the file
        limits={"/v1/checkpoints": settings.max_checkpoint_bytes + UPLOAD_FRAMING},
        timeout_s=settings.body_timeout_s,
        idle_timeout_s=settings.body_idle_timeout_s,
        on_disconnect=metrics.disconnects.inc,
        receiving=metrics.receiving.inc,
    )
    app.add_middleware(RequestLog)  # inside RequestId: it reads the id RequestId chose
    app.add_middleware(RequestId)
    return app


def _live(engine: EngineClient | None, front: FrontEnd | None) -> dict[str, float] | None:
    """What /metrics reads at scrape time (service/metrics.py)."""
    if engine is None or not engine.ready:
        return None
    in_progress = {"in_progress": float(front.total_admitted())} if front is not None else {}
    return {**engine.stats(), **in_progress}


def _log_ready(settings: Settings, engine: EngineClient) -> None:
    facts = engine.describe()
    auth = "keys" if settings.auth_enabled else "none"
    runtime = facts.get("runtime", "-")
    log.info(
        "ready: %s on %s, runtime %s, store %s, auth %s",
        facts["backbone"], facts["device"], runtime, settings.store.split("@")[-1], auth,
        extra={  # the same facts as fields, for JSON logs (the store URL without password)
            **{k: facts[k] for k in ("backbone", "pretrained", "fingerprint", "device")},
            "runtime": runtime, "store": redact_url(settings.store), "auth": auth,
        },
    )  # fmt: skip


def app_from_env() -> Any:
    """Factory for `uvicorn --factory service.app:app_from_env` (settings from the environment)."""
    return create_app(Settings())
