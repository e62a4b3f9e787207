"""The dynamic batcher: coalescing, mixed checkpoints, a free event loop, load shedding, deadlines,
error isolation and draining. Async tests run under `asyncio.run` (no pytest-asyncio)."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch

from service import errors
from service.engine.batcher import Batcher
from service.engine.forward import encode
from service.prompts import get_method
from service.prompts.plans import Plan

DUMMY = Plan(labels=("a", "b"), logit_scale=1.0, classes=torch.eye(2, 4))


def _plan(backbone, method, classnames, seed, config=None):
    m = get_method(method)
    cfg = m.config(config or {})
    params = m.init(backbone, cfg, classnames, seed=seed)
    params = {k: v + 0.05 * torch.randn_like(v) for k, v in params.items()}
    return m.materialize(params, backbone, cfg, classnames)


def marked(value: float, n: int = 1) -> torch.Tensor:
    """n tiny images filled with `value`: which request an image came from is readable in `run`."""
    return torch.full((n, 3, 2, 2), float(value))


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


class FakeRun:
    """A model stand-in: features = the images' first pixel; records every call, can be gated."""

    def __init__(
        self, sleep: float = 0.0, gated: bool = False, fail: Callable[[int], Any] | None = None
    ):
        self.sleep, self.fail = sleep, fail
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.entered = threading.Event()
        self.calls: list[list[float]] = []  # markers per call
        self.plans: list[list[Plan]] = []
        self.threads: set[int] = set()
        self.active = self.max_active = 0

    def __call__(self, images: torch.Tensor, plans: list[Plan]) -> torch.Tensor:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            self.threads.add(threading.get_ident())
            self.calls.append(images[:, 0, 0, 0].tolist())
            self.plans.append(list(plans))
            self.entered.set()
            assert self.gate.wait(10), "test gate never opened"
            time.sleep(self.sleep)
            if self.fail is not None:
                self.fail(len(self.calls))
            return images[:, :, 0, 0].clone()  # [B, 3]
        finally:
            self.active -= 1

    def seen(self) -> set[float]:
        return {v for call in self.calls for v in call}

    async def wait_entered(self) -> None:
        await asyncio.to_thread(self.entered.wait, 5)
        assert self.entered.is_set()


def with_batcher(run: Any, body: Callable[[Batcher], Awaitable[Any]], **kwargs: Any) -> Any:
    """Run `body(batcher)` on a fresh loop with a started batcher, stopped (and ungated) after."""

    async def main() -> Any:
        batcher = Batcher(run, **kwargs)
        await batcher.start()
        try:
            return await body(batcher)
        finally:
            if isinstance(run, FakeRun):
                run.gate.set()
            await batcher.stop(timeout=5)

    return asyncio.run(main())


def test_concurrent_requests_are_coalesced_and_equal_unbatched(backbone, classnames):
    plans = [_plan(backbone, "maple", classnames, seed, {"depth": 2}) for seed in range(3)]
    plans.append(_plan(backbone, "cocoop", classnames, 0))  # finish runs the text tower
    images = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    chosen = [plans[i % len(plans)] for i in range(20)]
    alone = [
        chosen[i].logits(encode(backbone, images[i : i + 1], [chosen[i]]))[0] for i in range(20)
    ]
    sizes: list[int] = []
    batch_sizes: list[int] = []

    def run(imgs: torch.Tensor, ps: list[Plan]) -> torch.Tensor:
        sizes.append(imgs.shape[0])
        return encode(backbone, imgs, ps)

    async def body(b: Batcher) -> list[torch.Tensor]:
        return await asyncio.gather(
            *(b.submit(images[i : i + 1], [p], p.logits) for i, p in enumerate(chosen))
        )

    out = with_batcher(run, body, max_batch_size=8, max_wait_ms=20, on_batch=batch_sizes.append)
    assert sum(sizes) == 20 and max(sizes) <= 8
    assert len(sizes) <= 4  # 20 requests, 8 per batch: 3 calls, not 20
    assert batch_sizes == sizes  # on_batch sees every executed batch's image count
    for a, b in zip(alone, out, strict=True):
        assert b.shape == (1, len(classnames))
        assert torch.allclose(a, b[0], atol=1e-5)


def test_mixed_checkpoints_share_one_run_call(backbone, classnames):
    plans = [_plan(backbone, "maple", classnames, seed, {"depth": 2}) for seed in range(4)]
    assert len({p.signature for p in plans}) == 1
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    alone = [p.logits(encode(backbone, images[i : i + 1], [p])) for i, p in enumerate(plans)]
    passed: list[list[Plan]] = []

    def run(imgs: torch.Tensor, ps: list[Plan]) -> torch.Tensor:
        passed.append(list(ps))
        return encode(backbone, imgs, ps)

    async def body(b: Batcher) -> list[torch.Tensor]:
        return await asyncio.gather(
            *(b.submit(images[i : i + 1], [p], p.logits) for i, p in enumerate(plans))
        )

    out = with_batcher(run, body, max_batch_size=8, max_wait_ms=50)
    assert len(passed) == 1  # one call for four checkpoints
    assert [id(p) for p in passed[0]] == [id(p) for p in plans]
    for a, b in zip(alone, out, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_production_run_is_encode_partial(backbone, classnames, images):
    plan = _plan(backbone, "vpt", classnames, 0)
    run = functools.partial(encode, backbone)

    async def body(b: Batcher) -> torch.Tensor:
        return await b.submit(images, [plan] * len(images), plan.logits)

    out = with_batcher(run, body)
    assert torch.allclose(out, plan.logits(encode(backbone, images, [plan] * 5)), atol=1e-5)


def test_loop_keeps_running_while_a_batch_computes():
    run = FakeRun(sleep=0.3)
    finish_threads: set[int] = set()

    def finish(x: torch.Tensor) -> torch.Tensor:
        finish_threads.add(threading.get_ident())
        return x

    async def body(b: Batcher) -> int:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await b.submit(marked(1), [DUMMY], finish)
        done.set()
        await task
        return ticks

    ticks = with_batcher(run, body)
    assert ticks >= 10  # ~30 expected; 0 or 1 if run blocked the loop
    assert len(run.threads) == 1 and threading.get_ident() not in run.threads
    assert finish_threads == run.threads  # finish runs on the worker too, not on the loop


def test_batches_run_one_at_a_time_on_one_thread():
    run = FakeRun(sleep=0.02)

    async def body(b: Batcher) -> list[torch.Tensor]:
        return await asyncio.gather(*(b.submit(marked(i), [DUMMY], identity) for i in range(8)))

    out = with_batcher(run, body, max_batch_size=2, max_wait_ms=0)
    assert len(run.calls) == 4 and run.max_active == 1 and len(run.threads) == 1
    assert [float(o[0, 0]) for o in out] == [float(i) for i in range(8)]  # each got its own rows


def test_late_request_joins_within_the_wait_window_and_full_batch_does_not_wait():
    run = FakeRun()

    async def late(b: Batcher) -> None:
        first = asyncio.create_task(b.submit(marked(1), [DUMMY], identity))
        await asyncio.sleep(0.05)
        await asyncio.gather(first, b.submit(marked(2), [DUMMY], identity))

    with_batcher(run, late, max_batch_size=4, max_wait_ms=500)
    assert run.calls == [[1.0, 2.0]]

    run = FakeRun()

    async def full(b: Batcher) -> float:
        start = time.monotonic()
        await asyncio.gather(*(b.submit(marked(i), [DUMMY], identity) for i in range(2)))
        return time.monotonic() - start

    elapsed = with_batcher(run, full, max_batch_size=2, max_wait_ms=5000)
    assert elapsed < 2.0 and run.calls == [[0.0, 1.0]]


def test_requests_are_never_split():
    run = FakeRun()

    async def body(b: Batcher) -> list[torch.Tensor]:
        return await asyncio.gather(
            *(b.submit(marked(i, 3), [DUMMY] * 3, identity) for i in range(3))
        )

    out = with_batcher(run, body, max_batch_size=4, max_wait_ms=20)
    assert run.calls == [[0.0] * 3, [1.0] * 3, [2.0] * 3]  # 3 + 3 > 4: one request per call
    assert [o.shape[0] for o in out] == [3, 3, 3]


def test_full_queue_is_refused_immediately():
    run = FakeRun(gated=True)

    async def body(b: Batcher) -> tuple[float, str, list[torch.Tensor]]:
        running = asyncio.create_task(b.submit(marked(0), [DUMMY], identity))
        await run.wait_entered()  # the worker is now blocked on the gate
        queued = [asyncio.create_task(b.submit(marked(i), [DUMMY], identity)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        assert b.queue_depth == 2
        start = time.monotonic()
        with pytest.raises(errors.Overloaded) as info:
            await b.submit(marked(3), [DUMMY], identity)
        elapsed = time.monotonic() - start
        run.gate.set()
        return elapsed, info.value.message, await asyncio.gather(running, *queued)

    elapsed, message, out = with_batcher(run, body, max_batch_size=1, max_queue=2)
    assert elapsed < 0.05
    assert "overloaded" in message and "2 requests queued" in message
    assert errors.http_status(errors.Overloaded(message)) == 429
    assert [float(o[0, 0]) for o in out] == [0.0, 1.0, 2.0]  # the queued ones still complete
    assert 3.0 not in run.seen()


def test_expired_requests_never_reach_run():
    run = FakeRun(gated=True)

    async def body(b: Batcher) -> tuple[float, torch.Tensor]:
        blocker = asyncio.create_task(b.submit(marked(0), [DUMMY], identity))
        await run.wait_entered()
        with pytest.raises(errors.DeadlineExceeded):  # already passed: refused at the door
            await b.submit(marked(1), [DUMMY], identity, deadline=time.monotonic() - 1)
        start = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded):  # times out while queued behind the blocker
            await b.submit(marked(2), [DUMMY], identity, deadline=time.monotonic() + 0.05)
        waited = time.monotonic() - start
        assert b.queue_depth == 0  # it left the queue
        run.gate.set()
        await blocker
        return waited, await b.submit(marked(3), [DUMMY], identity, deadline=time.monotonic() + 5)

    waited, after = with_batcher(run, body, max_batch_size=4)
    assert 0.04 <= waited < 0.25  # raised at its deadline, not when the slow batch ended
    assert float(after[0, 0]) == 3.0
    assert run.seen() == {0.0, 3.0}  # 1 and 2 cost no compute


def test_request_expiring_inside_the_batch_window_is_dropped_from_the_batch():
    run = FakeRun()

    async def body(b: Batcher) -> None:
        keep = asyncio.create_task(b.submit(marked(1), [DUMMY], identity))
        with pytest.raises(errors.DeadlineExceeded):
            await b.submit(marked(2), [DUMMY], identity, deadline=time.monotonic() + 0.03)
        await keep

    with_batcher(run, body, max_batch_size=4, max_wait_ms=200)
    assert run.calls == [[1.0]]


def test_cancelled_caller_is_skipped():
    run = FakeRun(gated=True)

    async def body(b: Batcher) -> None:
        blocker = asyncio.create_task(b.submit(marked(0), [DUMMY], identity))
        await run.wait_entered()
        gone = asyncio.create_task(b.submit(marked(1), [DUMMY], identity))
        await asyncio.sleep(0.01)
        assert b.queue_depth == 1
        gone.cancel()  # the client disconnected
        await asyncio.sleep(0)
        assert b.queue_depth == 0
        run.gate.set()
        await blocker
        await b.submit(marked(2), [DUMMY], identity)
        assert gone.cancelled()

    with_batcher(run, body, max_batch_size=4)
    assert run.seen() == {0.0, 2.0}


def test_failing_finish_fails_only_its_request():
    run = FakeRun()

    def bad(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("bad post-processing")

    async def body(b: Batcher) -> list[Any]:
        finishes = [identity, bad, identity]
        return await asyncio.gather(
            *(b.submit(marked(i), [DUMMY], f) for i, f in enumerate(finishes)),
            return_exceptions=True,
        )

    out = with_batcher(run, body, max_batch_size=8, max_wait_ms=20)
    assert len(run.calls) == 1  # all three shared the batch
    assert isinstance(out[1], ValueError)
    assert float(out[0][0, 0]) == 0.0 and float(out[2][0, 0]) == 2.0


@pytest.mark.parametrize("error", [RuntimeError("cuda oom"), errors.BackboneError("gone")])
def test_failing_run_fails_its_batch_only_and_the_batcher_recovers(error):
    def fail(call: int) -> None:
        if call == 1:
            raise error

    run = FakeRun(fail=fail)

    async def body(b: Batcher) -> list[Any]:
        first = await asyncio.gather(
            *(b.submit(marked(i), [DUMMY], identity) for i in range(4)), return_exceptions=True
        )
        later = await b.submit(marked(9), [DUMMY], identity)
        return [*first, later]

    out = with_batcher(run, body, max_batch_size=2, max_wait_ms=20)
    assert run.calls[:2] == [[0.0, 1.0], [2.0, 3.0]]
    assert out[0] is error and out[1] is error  # passed through as is
    assert [float(o[0, 0]) for o in out[2:]] == [2.0, 3.0, 9.0]


def test_bad_requests_are_refused_before_queueing():
    run = FakeRun()

    async def body(b: Batcher) -> None:
        with pytest.raises(errors.TooManyImages):
            await b.submit(marked(0, 5), [DUMMY] * 5, identity)
        with pytest.raises(ValueError):
            await b.submit(marked(0, 2), [DUMMY], identity)
        with pytest.raises(errors.BadRequest):
            await b.submit(marked(0, 0), [], identity)
        assert b.queue_depth == 0

    with_batcher(run, body, max_batch_size=4)
    assert run.calls == []
    assert errors.http_status(errors.TooManyImages("x")) == 413


def test_stop_drains_queued_work_then_refuses():
    run = FakeRun(sleep=0.02)

    async def main() -> tuple[list[torch.Tensor], list[float]]:
        b = Batcher(run, max_batch_size=1)
        with pytest.raises(errors.NotReady):  # not started yet
            await b.submit(marked(0), [DUMMY], identity)
        await b.start()
        tasks = [asyncio.create_task(b.submit(marked(i), [DUMMY], identity)) for i in range(5)]
        await asyncio.sleep(0)
        await b.stop()
        assert all(t.done() for t in tasks)  # stop returned only after the queue drained
        with pytest.raises(errors.NotReady, match="shutting down"):
            await b.submit(marked(9), [DUMMY], identity)
        await b.stop()  # idempotent
        return [t.result() for t in tasks], sorted(run.seen())

    out, seen = asyncio.run(main())
    assert [float(o[0, 0]) for o in out] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert seen == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_stop_is_bounded_and_answers_what_it_abandons():
    run = FakeRun(gated=True)

    async def main() -> float:
        b = Batcher(run, max_batch_size=1)
        await b.start()
        tasks = [asyncio.create_task(b.submit(marked(i), [DUMMY], identity)) for i in range(3)]
        await run.wait_entered()
        start = time.monotonic()
        await b.stop(timeout=0.1)
        elapsed = time.monotonic() - start
        results = await asyncio.gather(*tasks, return_exceptions=True)
        run.gate.set()
        assert all(isinstance(r, errors.NotReady) for r in results)
        return elapsed

    elapsed = asyncio.run(main())
    assert 0.09 <= elapsed < 1.0
    assert run.seen() == {0.0}  # the queued two never ran


def test_a_request_is_cheap_to_print():
    """deque.remove formats a missing item into its error: the default dataclass repr printed
    the image tensors, a third of the server's CPU under load (bench/load.py, py-spy)."""
    from service.engine.batcher import _Request

    images = torch.zeros(2, 3, 224, 224)
    req = _Request(images, 2, [], lambda f: f, None, None)  # type: ignore[arg-type]
    assert repr(req) == "_Request(n=2, shape=(2, 3, 224, 224))"


def test_other_model_work_runs_on_the_worker_thread_after_queued_batches():
    """Ad-hoc text encoding goes through `run_on_worker`: on the model's one thread (never in
    parallel with a batch) and behind the image batches already waiting there."""
    run = FakeRun(gated=True)
    order: list[str] = []

    async def body(b: Batcher) -> None:
        first = asyncio.create_task(b.submit(marked(1), [DUMMY], identity))
        await run.wait_entered()  # a batch is computing ...
        second = asyncio.create_task(b.submit(marked(2), [DUMMY], identity))
        await asyncio.sleep(0)  # ... and another waits in the queue

        def text_work() -> int:
            order.append("text")
            return threading.get_ident()

        other = asyncio.create_task(b.run_on_worker(text_work, patience_s=30))
        await asyncio.sleep(0.05)
        assert order == []  # it waits: the queue is not empty
        run.gate.set()
        await first
        order.append("batch 1")
        await second
        order.append("batch 2")
        thread = await other
        assert thread in run.threads

    with_batcher(run, body, max_batch_size=1, max_wait_ms=0)
    assert order.index("text") > 0  # after the waiting image batch had its turn
