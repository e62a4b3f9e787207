"""Continuous batching (engine/continuous.py, slot_batch.py) on the tiny LLaVA: every request's
greedy answer is the one it gets alone, whatever joins or leaves the batch around it.

Parity is exact token equality against `LlavaBackbone.greedy` run on the request alone (the static
reference): greedy argmax is stable under the reordered float sums of a batched or chunked
forward on every CPU we know (the margins of these random models' logits are far above 1e-5);
fp32 throughout. Arrivals are at seeded STEP indices, not times, so nothing depends on speed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from typing import Any

import pytest
import torch
from PIL import Image

from service.backbones.llava import LlavaBackbone
from service.engine.answering import make_engine, user_message
from service.engine.continuous import ContinuousEngine, plan_next
from service.engine.gen_request import Event, GenRequest, Sampling
from service.engine.generation import GenerationEngine
from service.engine.slot_batch import SlotBatch
from service.errors import DeadlineExceeded, Overloaded
from service.prompts.m2pt import M2PT, PLAIN_ANSWER_PLAN, AnswerPlan, batch_prompts
from service.settings import Settings
from tests.llava.conftest import make_backbone

QUESTIONS = ["what is in the image?", "colour?", "how many shapes are there in it?", "hi",
             "describe the colour of the shape. what colour is it? " * 3]  # fmt: skip


@pytest.fixture(scope="module")
def bb() -> LlavaBackbone:
    return make_backbone(0)


def m2pt_plan(bb: LlavaBackbone, seed: int, **cfg: Any) -> AnswerPlan:
    """Large random prompts (x50), so that a checkpoint visibly changes the answers."""
    method = M2PT()
    config = method.config(cfg)
    params = {k: v * 50 for k, v in method.init(bb, config, seed=seed).items()}
    gen = torch.Generator().manual_seed(seed)
    for k, v in params.items():  # a projector or head of its own, unlike the frozen ones
        if k.startswith("projector.") or k == "head.weight":
            params[k] = v + torch.randn(v.shape, generator=gen) * 0.5
    plan: AnswerPlan = method.materialize(params, bb, config)
    return plan


def plans(bb: LlavaBackbone) -> list[AnswerPlan]:
    """The plain model and M²PT checkpoints of five different shapes (one with a projector of
    its own, one with an output head of its own, as the reference trains them)."""
    return [
        PLAIN_ANSWER_PLAN,
        m2pt_plan(bb, 1, n_visual=4, n_text=3),
        m2pt_plan(bb, 2, n_visual=2, n_text=5, text_depth=2),
        m2pt_plan(bb, 3, n_visual=0, n_text=2),
        m2pt_plan(bb, 4, n_visual=3, n_text=0, train_projector=True),
        m2pt_plan(bb, 5, n_visual=2, n_text=2, train_head=True),
    ]


def requests(bb: LlavaBackbone, n: int, seed: int) -> list[tuple[list[int], Any, AnswerPlan, int]]:
    rng = random.Random(seed)
    colours = [(250, 10, 10), (10, 200, 30), (20, 40, 230)]
    out = []
    for _ in range(n):
        plan = rng.choice(plans(bb))
        image = rng.random() < 0.6
        ids = bb.encode_chat(user_message(rng.choice(QUESTIONS), image), int(image), plan.n_visual)
        pixels = (
            bb.pixel_values([Image.new("RGB", (40, 40), rng.choice(colours))]) if image else None
        )
        out.append((ids, pixels, plan, rng.randint(1, 14)))
    return out


def alone(bb: LlavaBackbone, ids: list[int], pixels: Any, plan: AnswerPlan, n: int) -> list[int]:
    """The reference: greedy on this request alone, cut at its first end-of-sequence token."""
    ref = bb.greedy([ids], pixels, batch_prompts([plan], bb.dtype), max_new_tokens=n)[0]
    stop = next((i for i, t in enumerate(ref) if t in bb.eos_ids), len(ref))
    return ref[:stop]


def drive(bb: LlavaBackbone, reqs: list, arrivals: list[int], slots: int, budget: int) -> dict:
    """Run the running batch step by step, each request queued at its arrival step."""
    loop = asyncio.new_event_loop()
    batch = SlotBatch(bb, slots, 256)
    made = [GenRequest(ids, px, plan, Sampling(n), None, asyncio.Queue(), loop)
            for ids, px, plan, n in reqs]  # fmt: skip
    order = sorted(range(len(made)), key=lambda i: arrivals[i])
    queue: deque[GenRequest] = deque()
    step, mixed, chunked = 0, 0, 0
    with torch.inference_mode():
        while order or queue or not batch.idle:
            while order and arrivals[order[0]] <= step:
                queue.append(made[order.pop(0)])
            continued, admitted = plan_next(batch, queue, budget)
            chunked += sum(1 for row, take in continued if take and row.done)
            batch.step(continued, admitted)
            decoding = {id(r.request.plan) for r in batch.rows[: batch.n] if r is not None}
            mixed = max(mixed, len(decoding))
            step += 1
    loop.run_until_complete(asyncio.sleep(0))  # deliver the events sent to each request
    ends = [[e for e in _drain(r.queue) if e.finish_reason] for r in made]
    loop.close()
    return {"tokens": [r.generated for r in made], "ends": ends, "mixed": mixed,
            "chunked": chunked, "steps": step}  # fmt: skip


def _drain(queue: asyncio.Queue[Event]) -> list[Event]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_every_answer_is_the_one_it_gets_alone(bb: LlavaBackbone, seed: int) -> None:
    reqs = requests(bb, 14, seed)
    rng = random.Random(100 + seed)
    arrivals = [rng.randint(0, 30) for _ in reqs]
    got = drive(bb, reqs, arrivals, slots=4, budget=24)
    expected = [alone(bb, ids, px, plan, n) for ids, px, plan, n in reqs]
    assert got["tokens"] == expected
    for (_, _, _, n), tokens, ends in zip(reqs, got["tokens"], got["ends"], strict=True):
        assert len(ends) == 1 and ends[0].finish_reason == (
            "length" if len(tokens) == n else "stop"
        )
    # what makes the test mean something: several checkpoints decoded in one step, prompts
    # prefilled over several steps, and the checkpoints do change the answers
    assert got["mixed"] >= 3 and got["chunked"] >= 1
    ids = bb.encode_chat(user_message("hi", False), 0)
    assert len({tuple(alone(bb, ids, None, p, 8)) for p in plans(bb) if not p.n_visual}) >= 2


def test_arrival_order_does_not_change_any_answer(bb: LlavaBackbone) -> None:
    reqs = requests(bb, 8, 7)
    together = drive(bb, reqs, [0] * len(reqs), slots=8, budget=512)
    one_by_one = drive(bb, reqs, [10 * i for i in range(len(reqs))], slots=1, budget=9)
    assert together["tokens"] == one_by_one["tokens"]


def test_a_caller_who_leaves_frees_the_slot_at_the_next_step(bb: LlavaBackbone) -> None:
    loop = asyncio.new_event_loop()
    batch = SlotBatch(bb, 1, 256)
    ids = bb.encode_chat(user_message("hi", False), 0)
    first = GenRequest(ids, None, PLAIN_ANSWER_PLAN, Sampling(200), None, asyncio.Queue(), loop)
    second = GenRequest(ids, None, PLAIN_ANSWER_PLAN, Sampling(3), None, asyncio.Queue(), loop)
    queue = deque([first, second])
    with torch.inference_mode():
        batch.step(*plan_next(batch, queue, 64))
        assert batch.free_slots == 0 and list(queue) == [second]
        made = len(first.generated)  # its first token (prefill), its second (the decode step)
        first.left = True  # the client disconnected
        batch.step(*plan_next(batch, queue, 64))
        assert batch.idle and batch.free_slots == 1 and len(first.generated) == made == 2
        batch.step(*plan_next(batch, queue, 64))  # the waiting request gets the slot
        assert not queue and batch.rows[0] is not None and batch.rows[0].request is second
    loop.close()


def test_a_passed_deadline_ends_the_row_with_a_504(bb: LlavaBackbone) -> None:
    loop = asyncio.new_event_loop()
    batch = SlotBatch(bb, 2, 256)
    ids = bb.encode_chat(user_message("hi", False), 0)
    late = GenRequest(ids, None, PLAIN_ANSWER_PLAN, Sampling(50), None, asyncio.Queue(), loop)
    with torch.inference_mode():
        batch.step(*plan_next(batch, deque([late]), 64))
        late.deadline = time.monotonic() - 1
        batch.step([], [])
    assert batch.idle
    loop.run_until_complete(asyncio.sleep(0))
    assert isinstance(_drain(late.queue)[-1].error, DeadlineExceeded)
    loop.close()


def never_stops() -> LlavaBackbone:
    bb = make_backbone(0)
    bb.eos_ids = frozenset()  # every request runs to its max_new_tokens
    return bb


def test_the_engine_answers_concurrent_callers_as_alone() -> None:
    bb = never_stops()
    reqs = requests(bb, 6, 3)

    async def run() -> list[list[int]]:
        engine = ContinuousEngine(bb, slots=3, step_tokens=20)
        await engine.start()
        rng = random.Random(5)

        async def one(at: int, ids: list[int], px: Any, plan: AnswerPlan, n: int) -> list[int]:
            while engine.steps < at and not engine.batch.idle:  # arrive at (about) step `at`
                await asyncio.sleep(0.001)
            tokens, reason = await engine.complete(ids, px, plan, Sampling(n))
            assert reason == "length"
            return tokens

        outs = await asyncio.gather(*(one(rng.randint(0, 12), *r) for r in reqs))
        await engine.stop()
        assert engine.batch.idle and max(engine.batches) >= 2
        return list(outs)

    assert asyncio.run(run()) == [alone(bb, *r) for r in reqs]


def test_a_stream_closed_by_its_client_lets_the_next_request_run() -> None:
    bb = never_stops()
    ids = bb.encode_chat(user_message("hi", False), 0)

    async def run() -> None:
        engine = ContinuousEngine(bb, slots=1, step_tokens=64, max_len=256)
        await engine.start()
        stream = engine.stream(ids, None, PLAIN_ANSWER_PLAN, Sampling(256 - len(ids)))
        assert (await anext(stream)).tokens
        await stream.aclose()  # the client went away
        tokens, _ = await engine.complete(ids, None, PLAIN_ANSWER_PLAN, Sampling(4))
        # the first needed ~240 more steps: its slot was freed long before
        assert len(tokens) == 4 and engine.steps < 120
        await engine.stop()
        assert engine.batch.idle

    asyncio.run(run())


def test_overload_is_refused_with_overloaded() -> None:
    bb = never_stops()
    ids = bb.encode_chat(user_message("hi", False), 0)

    async def run() -> None:
        engine = ContinuousEngine(bb, slots=1, max_queue=1, step_tokens=64)
        await engine.start()
        running = engine.stream(ids, None, PLAIN_ANSWER_PLAN, Sampling(100))
        await anext(running)  # holds the only slot
        queued = asyncio.ensure_future(engine.complete(ids, None, PLAIN_ANSWER_PLAN, Sampling(2)))
        while engine.queue_depth < 1:
            await asyncio.sleep(0.001)
        with pytest.raises(Overloaded):
            await engine.complete(ids, None, PLAIN_ANSWER_PLAN, Sampling(1))
        await running.aclose()
        assert len((await queued)[0]) == 2
        await engine.stop()

    asyncio.run(run())


def test_the_static_batcher_stays_selectable(bb: LlavaBackbone) -> None:
    assert isinstance(make_engine(Settings(generation="static"), bb), GenerationEngine)
    engine = make_engine(Settings(gen_max_batch_size=4, gen_max_len=128), bb)
    assert isinstance(engine, ContinuousEngine)
    assert engine.batch.free_slots == 4 and engine.batch.max_len == 128


def test_a_full_queue_is_a_429_with_retry_after(tmp_path: Any) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app

    bb = never_stops()
    settings = Settings(store=f"file://{tmp_path}", backbone="llava", max_queue=1)
    with TestClient(create_app(settings, backbone=bb)) as client:
        engine = client.app.state.engine.generation.engine  # type: ignore[attr-defined]
        assert isinstance(engine, ContinuousEngine)
        body = {"instruction": "hi", "max_new_tokens": 2}
        assert client.post("/v1/answer", json=body).status_code == 200
        # a request parked in the queue without waking the idle engine: the queue is full
        ids = bb.encode_chat(user_message("hi", False), 0)
        parked = GenRequest(ids, None, PLAIN_ANSWER_PLAN, Sampling(1), None, asyncio.Queue(),
                            asyncio.new_event_loop())  # fmt: skip
        engine._queue.append(parked)
        try:
            r = client.post("/v1/answer", json=body)
            assert r.status_code == 429 and r.headers["Retry-After"]
            assert r.json()["error"]["code"] == "overloaded"
        finally:
            engine._queue.remove(parked)
        assert client.post("/v1/answer", json=body).status_code == 200


def test_one_request_failing_its_prefill_fails_alone(bb: LlavaBackbone) -> None:
    loop = asyncio.new_event_loop()
    batch = SlotBatch(bb, 2, 256)
    ids = bb.encode_chat(user_message("what is in the image?", True), 1)
    good_px = bb.pixel_values([Image.new("RGB", (40, 40), (9, 200, 9))])
    bad_px = torch.zeros(1, 3, 8, 8)  # not the tower's input size: its vision forward raises
    good = GenRequest(ids, good_px, PLAIN_ANSWER_PLAN, Sampling(5), None, asyncio.Queue(), loop)
    bad = GenRequest(ids, bad_px, PLAIN_ANSWER_PLAN, Sampling(5), None, asyncio.Queue(), loop)
    queue = deque([bad, good])
    with torch.inference_mode():
        while queue or not batch.idle:
            batch.step(*plan_next(batch, queue, 64))
    loop.run_until_complete(asyncio.sleep(0))
    assert _drain(bad.queue)[-1].error is not None
    assert good.generated == alone(bb, ids, good_px, PLAIN_ANSWER_PLAN, 5)
    loop.close()
