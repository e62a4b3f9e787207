"""The cost of per-checkpoint output heads (issue 18): one batch whose rows use 1, 4 or 16
distinct heads, against the same batch on one shared head.

    .venv/bin/python -m bench.llava --heads [--tokens 16] [--repeats 3]

1. Through the generation engine on the tiny in-test LLaVA: 16 concurrent requests in one batch,
   every row with the same prompts; tokens/s with the base's head for all ("shared"), and with
   1, 4 or 16 distinct heads of their own (only the heads differ). This measures the grouping itself
   (one product per distinct head, rows assembled in order); the tiny head (320 x 48) costs
   nothing next to the model.
2. The head product at LLaVA-7B's shape (32000 x 4096, bf16) in isolation, as one decode step of
   16 rows computes it (`grouped.head_logits`): with a shared head the step reads 262 MB of head
   weights, with k distinct heads k x 262 MB. Decode is bound by memory reads, so on a GPU the
   extra time per step is about k x 262 MB / bandwidth; this CPU figure shows the scaling.
3. What the head reads mean for one decode step of LLaVA-v1-7B (bytes model, printed as such).
4. Residency's byte count for a 7B M²PT checkpoint with its head (the AnswerPlan, as served),
   and how many fit in 80 GB next to the base.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import torch
from PIL import Image

from service.backbones import grouped
from service.engine.answering import user_message
from service.engine.generation import GenerationEngine, Sampling
from service.prompts.m2pt import M2PT, AnswerPlan
from tests.llava.conftest import make_backbone

ROWS = 16
GB = 1e9


def plans(bb: Any, distinct: int) -> list[AnswerPlan]:
    """16 row plans with the same prompts (one tensor, shared as in one checkpoint's rows) and
    `distinct` output heads of their own (0: the base's head for all), so that only the heads
    differ between the configurations."""
    m = M2PT()
    cfg = m.config({})
    prompts = m.materialize(m.init(bb, cfg, seed=0), bb, cfg)
    if not distinct:
        return [prompts] * ROWS
    base = bb.model.lm_head.weight.detach()
    made = []
    for i in range(distinct):
        gen = torch.Generator().manual_seed(i)
        head = base.float() + 0.01 * torch.randn(base.shape, generator=gen)
        # an end-of-sequence logit of exactly 0 never beats the largest of the others: every row
        # runs its full length, as on the base's head (a row stopping early would cut tokens, not
        # cost, and make the configurations incomparable)
        head[sorted(bb.eos_ids)] = 0.0
        made.append(dataclasses.replace(prompts, head=head.to(base.dtype)))
    return [made[i % distinct] for i in range(ROWS)]


async def engine_tps(
    bb: Any, configs: dict[str, list[AnswerPlan]], tokens: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """Best (tokens per wall second, tokens per CPU second of this process) per configuration,
    measured in interleaved rounds (drifting background load on a shared machine then falls on
    every configuration alike; CPU time is what the batch itself cost, whatever else ran)."""
    pixels = bb.pixel_values([Image.new("RGB", (40, 40), (200, 30, 30))]).cpu()
    engine = GenerationEngine(bb, max_batch_size=ROWS, max_wait_ms=50)
    await engine.start()
    ids = bb.encode_chat(user_message("what is in the image?", True), 1, 10)

    async def once(rows: list[AnswerPlan], n: int) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        outs = await asyncio.gather(
            *(engine.complete(ids, pixels, p, Sampling(max_new_tokens=n)) for p in rows)
        )
        made = sum(len(t) for t, _ in outs)
        assert made == n * len(rows), "a row stopped early: the figures would not compare"
        return made / (time.perf_counter() - start), made / (time.process_time() - cpu)

    best = dict.fromkeys(configs, (0.0, 0.0))
    try:
        for rows in configs.values():
            await once(rows, 2)  # warm-up
        for _ in range(repeats):
            for label, rows in configs.items():
                wall, cpu = await once(rows, tokens)
                best[label] = (max(best[label][0], wall), max(best[label][1], cpu))
        assert set(engine.batches) == {ROWS}  # every measurement was one batch of 16
        return best
    finally:
        await engine.stop()


def head_step_ms(distinct: int, repeats: int, vocab: int = 32000, width: int = 4096) -> float:
    """One decode step's head products for 16 rows at 7B's shape (bf16), best of `repeats`."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(vocab, width, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    heads = [base.clone() for _ in range(distinct)]
    per_row = [heads[i % distinct] for i in range(ROWS)] if distinct else []
    hidden = torch.randn(ROWS, width, generator=gen).to(torch.bfloat16)
    best = float("inf")
    with torch.inference_mode():
        grouped.head_logits(hidden, per_row, base)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            grouped.head_logits(hidden, per_row, base)
            best = min(best, time.perf_counter() - start)
    return best * 1e3


def seven_b_plan() -> AnswerPlan:
    """A LLaVA-v1-7B M²PT plan as served (bf16 backbone): shapes only, on the meta device."""
    meta = torch.device("meta")
    return AnswerPlan(
        vision=torch.empty(24, 10, 1024, device=meta),  # float32 prompts, as materialized
        text=torch.empty(32, 10, 4096, device=meta),
        projector={
            "linear_1.weight": torch.empty(4096, 1024, dtype=torch.bfloat16, device=meta),
            "linear_1.bias": torch.empty(4096, dtype=torch.bfloat16, device=meta),
        },
        head=torch.empty(32000, 4096, dtype=torch.bfloat16, device=meta),
    )


def decode_step_gb(distinct: int, context: int = 512) -> float:
    """GB one decode step of 16 rows reads on LLaVA-v1-7B (bf16): the decoder's layers (Vicuna's
    6.74 B parameters less its embedding and head, 131 M each), each row's KV cache (32 layers x
    K and V x 4096 x 2 bytes per position, `context` positions) and the heads (at least the base's
    or one shared one). Decode at this batch is bound by these reads on a GPU, so the ratio of
    two configurations' bytes predicts the ratio of their step times there."""
    head = 32000 * 4096 * 2
    layers = (6.74e9 - 2 * 32000 * 4096) * 2
    kv = ROWS * context * 32 * 2 * 4096 * 2
    return (layers + kv + max(distinct, 1) * head) / GB


def main(tokens: int, repeats: int) -> None:
    torch.set_num_threads(2)
    bb = make_backbone(0)
    print(f"1. engine, tiny LLaVA, {ROWS} requests in one batch, {tokens} new tokens, CPU, "
          f"best of {repeats}")  # fmt: skip
    print("| heads in the batch | tokens/s | vs shared | tokens per CPU s | vs shared |")
    print("|---|---:|---:|---:|---:|")
    configs = {"shared (the base's)": plans(bb, 0)}
    configs.update({f"{k} distinct": plans(bb, k) for k in (1, 4, 16)})
    tps = asyncio.run(engine_tps(bb, configs, tokens, repeats))
    wall, cpu = tps["shared (the base's)"]
    for label, (w, c) in tps.items():
        print(f"| {label} | {w:.0f} | {w / wall:.2f} | {c:.0f} | {c / cpu:.2f} |")
    print(f"\n2. head product of one decode step, {ROWS} rows, 32000 x 4096 bf16, CPU, best of "
          f"{repeats}")  # fmt: skip
    print("| heads in the batch | head bytes read | ms | vs shared |")
    print("|---|---:|---:|---:|")
    one = head_step_ms(0, repeats)
    print(f"| shared | 262 MB | {one:.1f} | 1.00 |")
    for k in (1, 4, 16):
        ms = head_step_ms(k, repeats)
        print(f"| {k} distinct | {k * 262} MB | {ms:.1f} | {ms / one:.2f} |")
    print(f"\n3. bytes read by one decode step of {ROWS} rows on LLaVA-v1-7B, bf16, 512-token "
          "contexts (a model of memory-bound decode, not a measurement)")  # fmt: skip
    print("| heads in the batch | GB per step | predicted tokens/s vs shared |")
    print("|---|---:|---:|")
    shared_gb = decode_step_gb(0)
    for k in (0, 1, 4, 16):
        gb = decode_step_gb(k)
        print(f"| {k or 'shared'}{' distinct' if k else ''} | {gb:.2f} | {shared_gb / gb:.2f} |")
    plan = seven_b_plan()
    head = plan.head.nbytes if plan.head is not None else 0
    base = (6.74e9 + 0.30e9 + 4.2e6) * 2  # Vicuna-7B + CLIP ViT-L/14 + projector, bf16
    for kv in (0, 16):
        free = 80 * GB - base - kv * GB
        print(f"\n4. 7B M²PT checkpoint resident: {plan.nbytes / 1e6:.0f} MB (head "
              f"{head / 1e6:.0f} MB); 80 GB - base {base / GB:.1f} GB - KV cache "
              f"{kv} GB holds {int(free // plan.nbytes)} of them")  # fmt: skip
