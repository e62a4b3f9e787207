"""The lifespan of a LLaVA server: store, residency, the generation engine, warm-up, ready.

`create_app` hands over here when the backbone it was given (or loaded) is a LLaVA; the CLIP
path is untouched. Checkpoints load through the same store and residency (validation, LRU, hot
swap) as classification checkpoints.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from prompts_store import open_store
from service.api.deps import Services
from service.backbones.llava import LlavaBackbone
from service.engine.answering import Generation, user_message
from service.engine.generation import GenerationEngine, Sampling
from service.engine.residency import Residency
from service.images import ImageLimits
from service.prompts.m2pt import PLAIN_ANSWER_PLAN, AnswerPlan
from service.training.local_jobs import jobs_for


@asynccontextmanager
async def llava_lifespan(app: Any, services: Services, bb: LlavaBackbone) -> AsyncIterator[None]:
    """Wire the generation path; `app.state.generation` is what the answer routes use."""
    settings = services.settings
    store = open_store(settings.store)
    services.jobs = jobs_for(settings)  # M²PT jobs: RQ workers or our own child process
    residency = Residency(
        store,
        bb,
        AnswerPlan,
        device_budget=settings.device_budget_mib * 2**20,
        host_budget=settings.host_budget_mib * 2**20,
        max_checkpoint_bytes=settings.max_checkpoint_bytes,
    )
    residency.start()
    engine = GenerationEngine(
        bb,
        max_batch_size=settings.gen_max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        on_batch=services.metrics.batch_size.observe,
    )
    await engine.start()
    app.state.generation = Generation(
        backbone=bb,
        residency=residency,
        engine=engine,
        limits=ImageLimits(
            max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
        ),
        timeout_s=settings.request_timeout_s,
        max_new_tokens=settings.max_new_tokens,
    )
    # the backbone checkpoint uploads validate against (m2pt shapes, fingerprint)
    services.backbone, services.store, services.residency = bb, store, residency
    # one token through the whole path, so the first request does not pay for allocation
    ids = bb.encode_chat(user_message("warm up", False), 0)
    await engine.complete(ids, None, PLAIN_ANSWER_PLAN, Sampling(max_new_tokens=1))
    services.status = {
        "backbone": bb.model_name,
        "kind": "llava",
        "pretrained": bb.pretrained,
        "device": str(bb.device),
        "fingerprint": bb.fingerprint,
    }
    services.ready = True
    try:
        yield
    finally:
        services.ready = False
        await engine.stop(settings.shutdown_timeout_s)
        residency.close()
        store.close()
        if services.jobs is not None:
            services.jobs.close()
