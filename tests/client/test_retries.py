"""Retries of 429/503 honouring Retry-After, capped, against a real server that answers 429 (or
503) a given number of times and then 200; the cap's arithmetic checked on its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from promptserve.client import (
    AsyncClient,
    Client,
    ConflictError,
    OverloadedError,
    Retries,
    ServiceUnavailableError,
)
from promptserve.client.errors import retry_after
from tests.served import serve

ANSWER = {
    "results": [
        {
            "checkpoint": "pets",
            "version": 1,
            "method": "coop",
            "predictions": [[{"label": "cat", "score": 0.9}]],
        }
    ]
}


class Script:
    """What the fake service answers: `failures` times `status` (with `retry_after`), then 200."""

    def __init__(self) -> None:
        self.status, self.failures, self.retry_after = 429, 0, "1"
        self.hits: list[float] = []

    async def classify(self, request: Request) -> JSONResponse:
        await request.body()
        self.hits.append(time.monotonic())
        if len(self.hits) <= self.failures:
            headers = {} if self.retry_after is None else {"Retry-After": self.retry_after}
            code = {429: "overloaded", 503: "not_ready", 409: "conflict"}[self.status]
            body = {"error": {"code": code, "message": "come back later"}}
            return JSONResponse(body, status_code=self.status, headers=headers)
        return JSONResponse(ANSWER)


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, Script]]:
    script = Script()
    app = Starlette(routes=[Route("/v1/classify", script.classify, methods=["POST"])])
    with serve(app) as url:
        yield url, script


@pytest.fixture
def script(fake) -> Script:
    s = fake[1]
    s.__init__()  # type: ignore[misc]  # a fresh script per test, on the module's server
    return s


IMAGE = b"\x89PNG\r\n\x1a\n not decoded by the fake"


def test_429_then_200_waits_as_told_and_succeeds(fake, script):
    script.failures, script.retry_after = 2, "1"
    with Client(fake[0]) as c:
        answer = c.classify([IMAGE], checkpoint="pets")
    assert answer.results[0].predictions[0][0].label == "cat"
    assert len(script.hits) == 3
    gaps = [b - a for a, b in zip(script.hits, script.hits[1:], strict=False)]
    assert all(gap >= 0.99 for gap in gaps), gaps  # never earlier than Retry-After: 1


def test_503_is_retried_until_the_attempts_run_out(fake, script):
    script.status, script.failures, script.retry_after = 503, 100, "0"
    with (
        Client(fake[0], retries=Retries(attempts=3)) as c,
        pytest.raises(ServiceUnavailableError) as err,
    ):
        c.classify([IMAGE], checkpoint="pets")
    assert (err.value.status, err.value.code, err.value.retry_after) == (503, "not_ready", 0.0)
    assert len(script.hits) == 3


def test_a_retry_after_beyond_the_cap_gives_up_at_once(fake, script):
    script.failures, script.retry_after = 1, "60"
    with Client(fake[0], retries=Retries(max_wait_s=5)) as c, pytest.raises(OverloadedError) as err:
        c.classify([IMAGE], checkpoint="pets")
    assert err.value.retry_after == 60.0 and len(script.hits) == 1  # not back before 60 s


def test_other_errors_are_not_retried(fake, script):
    script.status, script.failures = 409, 5
    with Client(fake[0]) as c, pytest.raises(ConflictError):
        c.classify([IMAGE], checkpoint="pets")
    assert len(script.hits) == 1


def test_the_async_client_retries_too(fake, script):
    script.failures, script.retry_after = 1, "1"

    async def go():
        async with AsyncClient(fake[0]) as c:
            return await c.classify([IMAGE], checkpoint="pets")

    assert asyncio.run(go()).results[0].checkpoint == "pets"
    assert len(script.hits) == 2 and script.hits[1] - script.hits[0] >= 0.99


def test_the_cap_arithmetic():
    r = Retries(attempts=4, total_s=10.0, max_wait_s=5.0, backoff_s=0.5)
    busy = OverloadedError(429, "overloaded", "", retry_after=2.0)
    assert r.delay(1, busy, elapsed=0.0) == 2.0
    assert r.delay(1, busy, elapsed=8.5) is None  # would start after total_s
    assert r.delay(4, busy, elapsed=0.0) is None  # attempts used up
    silent = ServiceUnavailableError(503, "not_ready", "", retry_after=None)
    assert [r.delay(n, silent, 0.0) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]  # back-off
    assert r.delay(1, ConflictError(409, "conflict", ""), 0.0) is None


def test_retry_after_reads_seconds_and_dates():
    def header(value: str) -> float | None:
        return retry_after(httpx.Response(429, headers={"Retry-After": value}))

    assert header("3") == 3.0 and header("0.5") == 0.5 and header("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= (header(later) or 0) <= 30
    assert retry_after(httpx.Response(429)) is None


def test_the_real_service_503_and_its_retry_after(backbone, tmp_path):
    """The service itself (training jobs off: 503 not_ready, `Retry-After: 1`): the client reads
    the header the service sends, waits it out, retries, and raises the API's code at the end."""
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(
        store=f"file://{tmp_path / 'store'}", runtime="torch", pretrained="none", local_jobs=False
    )
    with (
        serve(create_app(settings, backbone=backbone)) as url,
        Client(url, retries=Retries(attempts=2, max_wait_s=5)) as c,
    ):
        start = time.monotonic()
        with pytest.raises(ServiceUnavailableError) as err:
            c.jobs.get("no-such-job")
        waited = time.monotonic() - start
    assert (err.value.status, err.value.code, err.value.retry_after) == (503, "not_ready", 1.0)
    assert "training jobs are off" in err.value.message
    assert waited >= 1.0  # one retry, not before the service's Retry-After: 1
