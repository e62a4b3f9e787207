"""Ad-hoc zero-shot plans: the same maths as the zeroshot method, and heavy requests bounded
(in-flight cap, deadline, chunks on the model's thread) so cheap ones are not starved."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from service import errors
from service.engine import zeroshot_cache
from service.engine.zeroshot_cache import ZeroShotCache
from service.prompts.registry import get_method

TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def test_plan_equals_the_zeroshot_method(backbone, classnames):
    method = get_method("zeroshot")
    ref = method.materialize({}, backbone, method.config(), classnames, TEMPLATES)
    got = asyncio.run(ZeroShotCache(backbone).plan(classnames, TEMPLATES))
    assert got.labels == ref.labels
    # chunking by classes changes batch sizes only: float32 rounding, far below 1e-5
    assert torch.allclose(got.classes, ref.classes, atol=1e-5)


def test_every_chunk_runs_through_the_given_runner(backbone, monkeypatch):
    monkeypatch.setattr(zeroshot_cache.ZeroShotCache, "chunk_size", lambda self: 3)
    calls = []

    async def run(fn):
        calls.append(1)
        return fn()

    names = [f"class {i}" for i in range(7)]
    cache = ZeroShotCache(backbone, run=run)
    asyncio.run(cache.plan(names, TEMPLATES))
    assert len(calls) == 3 * len(TEMPLATES)  # ceil(7 / 3) chunks per template
    asyncio.run(cache.plan(names, TEMPLATES))
    assert len(calls) == 6 and cache.hits == 1  # a hit costs no model work


def test_a_request_past_its_deadline_stops_costing_anything(backbone):  # no model call at all
    calls = []

    async def run(fn):
        calls.append(1)
        return fn()

    cache = ZeroShotCache(backbone, run=run)
    with pytest.raises(errors.DeadlineExceeded):
        asyncio.run(cache.plan(["a", "b"], TEMPLATES, deadline=time.monotonic() - 1))
    assert calls == [] and cache.pending == 0


def test_prompts_in_flight_are_capped_by_cost(backbone):
    """classes x templates in flight at once are bounded: a second heavy request is a 429 while
    the first runs, a small one still gets in, and the budget comes back afterwards."""

    async def scenario():
        gate = asyncio.Event()

        async def run(fn):
            await gate.wait()
            return fn()

        cache = ZeroShotCache(backbone, max_texts=10, run=run)
        first = asyncio.create_task(cache.plan([f"c{i}" for i in range(4)], TEMPLATES))  # 8
        await asyncio.sleep(0)
        assert cache.pending == 8
        with pytest.raises(errors.Overloaded):
            await cache.plan([f"d{i}" for i in range(2)], TEMPLATES)  # 4 more: over 10
        small = asyncio.create_task(cache.plan(["e"], TEMPLATES))  # 2 more: fits
        await asyncio.sleep(0)
        gate.set()
        await first
        await small
        assert cache.pending == 0
        await cache.plan([f"d{i}" for i in range(2)], TEMPLATES)  # now it fits

    asyncio.run(scenario())


def test_identical_requests_in_flight_share_one_computation(backbone, monkeypatch):
    # chunks sized by measured time would make the call count depend on the machine
    monkeypatch.setattr(zeroshot_cache.ZeroShotCache, "chunk_size", lambda self: 8)

    async def scenario():
        gate, calls = asyncio.Event(), []

        async def run(fn):
            calls.append(1)
            await gate.wait()
            return fn()

        cache = ZeroShotCache(backbone, run=run)
        a = asyncio.create_task(cache.plan(["x", "y"], TEMPLATES))
        b = asyncio.create_task(cache.plan(["x", "y"], TEMPLATES))
        await asyncio.sleep(0)
        gate.set()
        plan_a, plan_b = await a, await b
        assert plan_a is plan_b and len(calls) == len(TEMPLATES)

    asyncio.run(scenario())


def test_chunks_are_sized_to_a_time_budget_from_the_measured_rate(backbone):
    cache = ZeroShotCache(backbone)
    assert cache.chunk_size() == 8  # nothing measured yet: small
    cache.seconds_per_prompt = zeroshot_cache.CHUNK_SECONDS / 20
    assert cache.chunk_size() == 20
    cache.seconds_per_prompt = 1.0  # a slow text tower: one prompt at a time
    assert cache.chunk_size() == 1
    cache.seconds_per_prompt = 1e-9
    assert cache.chunk_size() == zeroshot_cache.MAX_CHUNK


def test_a_request_that_cannot_fit_its_deadline_is_refused_before_any_work(backbone):
    calls = []

    async def run(fn):
        calls.append(1)
        return fn()

    cache = ZeroShotCache(backbone, run=run)
    cache.seconds_per_prompt = 0.5  # as measured on a slow text tower
    names = [f"c{i}" for i in range(100)]  # 200 prompts: about 100 s of work
    with pytest.raises(errors.DeadlineExceeded) as exc:
        asyncio.run(cache.plan(names, TEMPLATES, deadline=time.monotonic() + 30))
    assert "about 100 s" in exc.value.message and calls == [] and cache.pending == 0
