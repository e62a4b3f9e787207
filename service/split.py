"""`promptserve serve --frontends N`: the processes of the split service and their entry points.

One engine process holds the backbone and everything that computes (engine/host.py); N HTTP
front ends run the same FastAPI app as one process does (service/app.py), with the engine
process as their `EngineClient` (engine/remote.py). The supervisor (service/supervisor.py)
starts, watches and stops them. With one front end, none of this runs: one process serves.

Why processes: everything before the encoder (HTTP, JSON, base64, decode, resize) is Python
under one GIL, about 4 ms of CPU per 640x480 JPEG, while a GPU encodes an image in a fraction
of a millisecond (docs/PERFORMANCE.md). Front ends scale that part with the cores.

Why LLaVA stays one process: a generation request costs hundreds of decode steps on the
device for one prompt of front-end work, so the front end is never its bottleneck, and its
token stream would need a second streaming channel across the split for no gain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from service import server
from service.backbones.registry import kind
from service.engine.control import ControlBlock
from service.engine.protocol import EngineClient
from service.engine.remote import remote_engine
from service.engine.shm import SHM_DIR, segment_name
from service.settings import Settings
from service.supervisor import Layout, Supervisor

log = logging.getLogger(__name__)

MAX_AUTO_FRONTENDS = 12
ENGINE_CORES = 2  # the engine's event loop and batch thread, on a GPU host


def splits(settings: Settings) -> bool:
    """Whether the backbone's capabilities are served across processes (classify and embed
    are; generation is not, see above)."""
    return "answer" not in kind(settings.backbone).cls.capabilities


def frontend_count(settings: Settings) -> tuple[int, str]:
    """How many front ends to run, and why (the start-up log says it)."""
    if settings.frontends != "auto":
        return settings.frontends, "--frontends"
    if not splits(settings):
        return 1, "the answer path is served by one process"
    if not settings.device.startswith("cuda"):
        return 1, "on a CPU device the engine needs the cores"
    if settings.queue is None and settings.local_jobs:
        return 1, "training jobs run in the service (set PROMPTSERVE_QUEUE for workers)"
    cores = len(os.sched_getaffinity(0))
    return max(1, min(MAX_AUTO_FRONTENDS, cores - ENGINE_CORES)), f"{cores} cores"


def check(settings: Settings, n: int) -> str | None:
    """Why `n` front ends cannot serve these settings (None: they can)."""
    if n <= 1:
        return None
    if not splits(settings):
        return f"a {settings.backbone} backbone is served by one process: use --frontends 1"
    if settings.queue is None and settings.local_jobs:
        return (
            "training jobs run inside the service (PROMPTSERVE_LOCAL_JOBS), which needs one "
            "process: set PROMPTSERVE_QUEUE=redis://... (workers train) or "
            "PROMPTSERVE_LOCAL_JOBS=false, or use --frontends 1"
        )
    return None


@dataclass
class FrontEndLink:
    """What a front-end process needs to reach the engine (service/app.py's `Remote`)."""

    index: int
    control: ControlBlock
    layout: Layout
    incarnation: int
    slots: int

    def connect(self) -> contextlib.AbstractAsyncContextManager[EngineClient]:
        return _connect(self)


@contextlib.asynccontextmanager
async def _connect(link: FrontEndLink) -> AsyncIterator[EngineClient]:
    name = link.layout.slots(link.index, link.incarnation)
    async with remote_engine(
        link.layout.engine_address, link.control, name, link.slots
    ) as engine:  # fmt: skip
        yield engine


def engine_process(layout: Layout, settings: Settings, generation: int) -> None:
    """The engine process: load the backbone, serve the front ends until SIGTERM."""
    from prompts_store import open_store
    from service.backbones.registry import load_backbone
    from service.engine.host import serve_engine
    from service.logs import configure
    from service.metrics import batch_histogram

    configure(settings.log_format, settings.log_level)
    control = ControlBlock.attach(layout.control, Path(layout.shm_dir))
    backbone = load_backbone(settings)
    store = open_store(settings.store)
    batches = batch_histogram(None)  # multiprocess mode: written for the front ends to sum
    try:
        asyncio.run(
            serve_engine(
                settings, backbone, store, control, layout.engine_address, generation,
                Path(layout.shm_dir), batches.observe,
            )
        )  # fmt: skip
    finally:
        store.close()
        control.close()


def frontend_process(
    layout: Layout, settings: Settings, index: int, incarnation: int, sock: socket.socket
) -> None:
    """Front end `index`: the HTTP app on the shared socket, the engine process behind it."""
    import uvicorn

    from service.app import create_app
    from service.logs import configure

    configure(settings.log_format, settings.log_level)
    control = ControlBlock.attach(layout.control, Path(layout.shm_dir))
    slots = 2 * max(settings.max_images, settings.max_batch_size)
    link = FrontEndLink(index, control, layout, incarnation, slots)
    app = create_app(settings, frontend=link)
    try:
        uvicorn.Server(server.config(app, settings)).run(sockets=[sock])
    finally:
        control.close()


def serve_if_split(settings: Settings) -> int | None:
    """Serve with front-end processes when the settings ask for more than one (the exit
    status), else None: one process serves, as the caller does."""
    n, why = frontend_count(settings)
    problem = check(settings, n)
    if problem is not None:
        print(f"error (frontends): {problem}", file=sys.stderr)
        return 2
    if n == 1:
        return None
    log.info("%d front ends (%s)", n, why)
    return serve_split(settings, n)


def serve_split(settings: Settings, n: int) -> int:
    """Run the engine and `n` front ends until SIGTERM; the service's exit status."""
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    # prometheus-client's multiprocess mode: every process writes here, /metrics sums them.
    # Set before any child starts (they read it when they import prometheus_client).
    # Named like the segments: a service killed with -9 leaves it, the next start removes it.
    metrics_dir = SHM_DIR / segment_name(os.getpid(), "metrics")
    metrics_dir.mkdir(mode=0o700)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    log.info("serving on %s:%d with %d front ends and one engine process", settings.host,
             settings.port, n)  # fmt: skip
    try:
        supervisor = Supervisor(
            engine_process, frontend_process, settings, n, sock,
            drain_timeout_s=settings.shutdown_timeout_s,
        )  # fmt: skip
        return supervisor.run()
    finally:
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
