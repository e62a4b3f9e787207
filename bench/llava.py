"""Generation throughput on the tiny in-test LLaVA: 1 request vs 8 concurrent, prompts vs plain.

    .venv/bin/python -m bench.llava [--tokens 32] [--repeats 3]
    .venv/bin/python -m bench.llava --heads [--tokens 16] [--repeats 3]   (bench/llava_heads.py)
    .venv/bin/python -m bench.llava --load ...  # Poisson load, continuous vs static

Tokens/s counts generated tokens (greedy, no early stop on this random model) over wall time,
through the engine (batched prefill + KV-cached decode). The M²PT overhead is the ratio of
plain to prompted tokens/s with the paper's defaults (10 visual + 10 textual tokens per layer).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch
from PIL import Image

from bench import llava_load
from service.engine.answering import user_message
from service.engine.generation import GenerationEngine, Sampling
from service.prompts.m2pt import M2PT, PLAIN_ANSWER_PLAN, AnswerPlan
from tests.llava.conftest import make_backbone


async def throughput(engine: GenerationEngine, reqs: list, tokens: int) -> float:
    start = time.perf_counter()
    outs = await asyncio.gather(
        *(engine.complete(ids, px, plan, Sampling(max_new_tokens=tokens)) for ids, px, plan in reqs)
    )
    return sum(len(t) for t, _ in outs) / (time.perf_counter() - start)


async def main(tokens: int, repeats: int) -> None:
    torch.set_num_threads(2)
    bb = make_backbone(0)
    m = M2PT()
    cfg = m.config({})
    prompted: AnswerPlan = m.materialize(m.init(bb, cfg, seed=1), bb, cfg)
    pixels = bb.pixel_values([Image.new("RGB", (40, 40), (200, 30, 30))]).cpu()
    engine = GenerationEngine(bb, max_batch_size=8, max_wait_ms=20)
    await engine.start()
    rows = []
    for label, plan in (("plain", PLAIN_ANSWER_PLAN), ("m2pt 10+10", prompted)):
        for n in (1, 8):
            ids = bb.encode_chat(user_message("what is in the image?", True), 1, plan.n_visual)
            reqs = [(ids, pixels, plan)] * n
            await throughput(engine, reqs, 4)  # warm-up
            best = max([await throughput(engine, reqs, tokens) for _ in range(repeats)])
            rows.append((label, n, best))
    await engine.stop()
    print(f"tiny LLaVA (CLIP 3x32 vision, Llama 3x48), {tokens} new tokens, CPU, best of {repeats}")
    print("| plan | concurrent requests | tokens/s |")
    print("|---|---|---|")
    for label, n, tps in rows:
        print(f"| {label} | {n} | {tps:.0f} |")
    plain = {n: t for lbl, n, t in rows if lbl == "plain"}
    for lbl, n, t in rows:
        if lbl != "plain":
            print(
                f"M²PT overhead at {n} concurrent: {plain[n] / t:.2f}x the plain model's time/token"
            )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--heads", action="store_true", help="per-checkpoint output heads' cost")
    p.add_argument("--load", action="store_true", help="Poisson load: bench/llava_load.py")
    llava_load.add_args(p)
    a = p.parse_args()
    if a.heads:
        from bench import llava_heads

        llava_heads.main(a.tokens, a.repeats)
    elif a.load:
        llava_load.main(a)
    else:
        asyncio.run(main(a.tokens, a.repeats))
