"""`AsyncClient` against the same real server: the calls, concurrency, and the same errors."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from promptserve.client import AsyncClient, Client, ConflictError, NotFoundError
from service import schemas
from tests.client.conftest import ADMIN, READ
from tests.engine.test_residency import checkpoint

PIXELS = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_async_calls_match_the_sync_client(url, backbone):
    async def go() -> None:
        async with AsyncClient(url, api_key=ADMIN) as admin, AsyncClient(url, api_key=READ) as rd:
            up = await admin.upload(checkpoint(backbone, name="birds", seed=3))
            assert isinstance(up, schemas.UploadResponse) and up.version == 1
            await admin.upload(checkpoint(backbone, name="birds", seed=4))
            answers = await asyncio.gather(  # concurrent requests on one client
                *(rd.classify([PIXELS], checkpoint=f"birds@{v}", top_k=2) for v in (1, 2, 1))
            )
            assert [a.results[0].version for a in answers] == [1, 2, 1]
            assert answers[0].results[0].predictions == answers[2].results[0].predictions
            with Client(url, api_key=READ) as sync:  # the same answer as the blocking client
                same = sync.classify([PIXELS], checkpoint="birds@2", top_k=2)
            assert same == answers[1]
            emb = await rd.embed([PIXELS], texts=["a bird"], checkpoint="birds")
            assert (emb.version, len(emb.text_embeddings)) == (2, 1)
            with pytest.raises(ConflictError) as lost:
                await admin.activate("birds", 1, expected=1)
            assert lost.value.status == 409
            assert (await admin.rollback("birds")).version == 1
            assert [v.active for v in (await rd.versions("birds")).versions] == [True, False]
            with pytest.raises(NotFoundError):
                await rd.jobs.get("no-such-job")
            assert "birds" in {c.name for c in (await rd.checkpoints()).checkpoints}

    asyncio.run(go())
