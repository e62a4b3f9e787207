"""Generation under load on the tiny LLaVA: continuous vs static batching, in one run.

    .venv/bin/python -m bench.llava --load [--rates 2,8,32] [--requests 40] [--checkpoints 1,10,100]

Requests arrive as a Poisson process (seeded) at each rate; each asks about an image, under one
of N M²PT checkpoints (the paper's 10 visual + 10 textual prompts per layer; N = 1, 10, 100,
picked at random per request), for an answer of 8-256 tokens (uniform; end-of-sequence is
disabled so every answer has its length). Per cell: generated tokens/s (over the whole cell,
first arrival to last token), time to first token (from arrival) p50/p99, inter-token latency
p50/p99. The unloaded prefill (one request alone, time to its first token) is the yardstick of
the issue's TTFT target. The rates sweep uses 1 checkpoint; the checkpoint mix runs at the
middle rate.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

import torch
from PIL import Image

from service.engine.answering import user_message
from service.engine.continuous import ContinuousEngine
from service.engine.gen_request import Sampling
from service.engine.generation import GenerationEngine
from service.prompts.m2pt import M2PT, AnswerPlan
from tests.llava.conftest import make_backbone


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def checkpoints(bb: Any, n: int) -> list[AnswerPlan]:
    m = M2PT()
    cfg = m.config({})
    return [m.materialize(m.init(bb, cfg, seed=100 + i), bb, cfg) for i in range(n)]


def engine_of(kind: str, bb: Any, slots: int) -> Any:
    if kind == "static":
        return GenerationEngine(bb, max_batch_size=slots, max_wait_ms=5.0)
    return ContinuousEngine(bb, slots=slots, step_tokens=512)


async def one(engine: Any, at: float, ids: list[int], px: Any, plan: AnswerPlan, n: int) -> dict:
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    start = time.perf_counter()
    stamps: list[float] = []
    async for event in engine.stream(ids, px, plan, Sampling(max_new_tokens=n)):
        stamps.extend([time.perf_counter()] * len(event.tokens))
    return {"start": start, "stamps": stamps}


async def cell(kind: str, bb: Any, reqs: list, rate: float, slots: int, seed: int) -> dict:
    engine = engine_of(kind, bb, slots)
    await engine.start()
    try:
        rng = random.Random(seed)
        t0 = time.perf_counter() + 0.05
        at, jobs = t0, []
        for ids, px, plan, n in reqs:
            jobs.append(one(engine, at, ids, px, plan, n))
            at += rng.expovariate(rate)
        outs = await asyncio.gather(*jobs)
    finally:
        await engine.stop()
    tokens = sum(len(o["stamps"]) for o in outs)
    end = max(o["stamps"][-1] for o in outs)
    ttft = [o["stamps"][0] - o["start"] for o in outs]
    itl = [b - a for o in outs for a, b in zip(o["stamps"], o["stamps"][1:], strict=False)]
    return {"engine": kind, "rate": rate, "tokens_s": tokens / (end - t0),
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99)}  # fmt: skip


def requests(bb: Any, plans: list[AnswerPlan], n: int, seed: int, pixels: Any) -> list:
    rng = random.Random(seed)
    ids = bb.encode_chat(user_message("what is in the image?", True), 1, plans[0].n_visual)
    return [(ids, pixels, rng.choice(plans), rng.randint(8, 256)) for _ in range(n)]


async def unloaded_prefill(bb: Any, plan: AnswerPlan, pixels: Any) -> float:
    engine = ContinuousEngine(bb, slots=8, step_tokens=512)
    await engine.start()
    ids = bb.encode_chat(user_message("what is in the image?", True), 1, plan.n_visual)
    times = []
    for _ in range(7):
        out = await one(engine, 0.0, ids, pixels, plan, 1)
        times.append(out["stamps"][0] - out["start"])
    await engine.stop()
    return statistics.median(times[2:])


async def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    bb = make_backbone(0)
    bb.eos_ids = frozenset()  # random weights: every answer runs to its length
    pixels = bb.pixel_values([Image.new("RGB", (40, 40), (200, 30, 30))]).cpu()
    counts = [int(c) for c in args.checkpoints.split(",")]
    plans = {n: checkpoints(bb, n) for n in counts}
    rates = [float(r) for r in args.rates.split(",")]
    prefill = await unloaded_prefill(bb, plans[counts[0]][0], pixels)
    await cell(
        "continuous",
        bb,
        requests(bb, plans[1 if 1 in plans else counts[0]], 4, 0, pixels),
        100.0,
        args.slots,
        0,
    )  # warm-up; fmt: skip
    rows = []
    for rate in rates:
        reqs = requests(bb, plans[counts[0]], args.requests, 1, pixels)
        for kind in ("continuous", "static"):
            rows.append({**await cell(kind, bb, reqs, rate, args.slots, 2), "ckpts": counts[0]})
    mid = rates[len(rates) // 2]
    for n in counts[1:]:
        reqs = requests(bb, plans[n], args.requests, 1, pixels)
        for kind in ("continuous", "static"):
            rows.append({**await cell(kind, bb, reqs, mid, args.slots, 2), "ckpts": n})
    print(f"tiny LLaVA, CPU ({args.threads} threads), {args.slots} slots / batch rows, "
          f"{args.requests} requests per cell, answers 8-256 tokens, M²PT 10+10")  # fmt: skip
    print(f"unloaded prefill (one request alone, time to first token): {prefill * 1000:.1f} ms")
    print("| engine | rate req/s | checkpoints | tokens/s | TTFT p50 ms | TTFT p99 ms | "
          "TTFT p99 / unloaded | ITL p50 ms | ITL p99 ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['rate']:g} | {r['ckpts']} | {r['tokens_s']:.0f} | "
              f"{r['ttft_p50'] * 1e3:.1f} | {r['ttft_p99'] * 1e3:.1f} | "
              f"{r['ttft_p99'] / prefill:.1f} | {r['itl_p50'] * 1e3:.2f} | "
              f"{r['itl_p99'] * 1e3:.2f} |")  # fmt: skip
    by = {(r["engine"], r["rate"], r["ckpts"]): r for r in rows}
    for rate in rates:
        c, s = by[("continuous", rate, counts[0])], by[("static", rate, counts[0])]
        print(f"rate {rate:g}: continuous / static tokens/s = {c['tokens_s'] / s['tokens_s']:.2f}")
    for n in counts[1:]:
        c = by[("continuous", mid, n)]["tokens_s"] / by[("continuous", mid, counts[0])]["tokens_s"]
        print(f"{n} checkpoints / {counts[0]} at rate {mid:g} (continuous): {c:.2f}x tokens/s")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rates", default="2,8,32", help="Poisson arrival rates, requests/s")
    p.add_argument("--requests", type=int, default=40, help="requests per cell")
    p.add_argument("--checkpoints", default="1,10,100")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)


def main(args: argparse.Namespace) -> None:
    asyncio.run(run(args))
