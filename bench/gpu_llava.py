"""bench/gpu.py's section 7 (issue 21): LLaVA-1.5-7B-shaped generation on the GPU, continuous
vs static batching, against the memory-bandwidth bound.

Random bf16 weights built from the published config (CLIP ViT-L/14-336 + Llama-2-7B; nothing
downloaded). For 1, 8, 32 and 64 concurrent streams (1, 2 in --dry-run) and each engine: all
streams arrive at once with one image and a short question (~600 prompt positions), and each
generates `tokens` tokens (end-of-sequence disabled). Reported per cell:
- TTFT p50 / max: arrival to first token (the continuous engine prefills in chunks of its step
  budget between decode steps, so later streams wait for earlier prefills);
- decode tokens/s: tokens made after the last stream's first token, over that interval
  (steady state, every stream decoding);
- the bound: streams / ((LM weights + every stream's KV read once) / measured bandwidth), and
  the fraction of it reached.
The decode step is eager PyTorch (no CUDA graph): at small batches it is bound by kernel
launches, not by bandwidth, which the fraction shows.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import torch


def llava_7b_shaped(ctx: Any) -> Any:
    """Random bf16 weights in LLaVA-1.5-7B's published shapes (CLIP ViT-L/14-336 + Llama-2-7B),
    built on the device; nothing downloaded. The tokenizer is the tests' tiny BPE: decode speed
    does not depend on it (vocab 32064 stays the model's)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    import service.backbones.llava as llava
    from tests.llava.conftest import tiny_processor

    tokenizer = tiny_processor().tokenizer  # type: ignore[attr-defined]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336},
                                           crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        chat_template=llava.DEFAULT_CHAT_TEMPLATE, num_additional_image_tokens=1,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                       num_hidden_layers=24, num_attention_heads=16,
                                       image_size=336, patch_size=14, projection_dim=768,
                                       hidden_act="quick_gelu"),
        text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                                max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )  # fmt: skip
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(ctx.device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    fingerprint = llava.fingerprint_state
    llava.fingerprint_state = lambda state: "sha256:random-7b-shaped"  # hashing 14 GB: minutes
    try:
        return llava.LlavaBackbone(model, processor, "llava-1.5-7b-shaped", "none",
                                   device=ctx.device, precision="bf16")  # fmt: skip
    finally:
        llava.fingerprint_state = fingerprint


async def _cell(engine: Any, n: int, ids: list[int], pixels: Any, tokens: int) -> dict:
    from service.engine.gen_request import Sampling
    from service.prompts.m2pt import PLAIN_ANSWER_PLAN

    async def one() -> list[float]:
        stamps: list[float] = []
        async for ev in engine.stream(ids, pixels, PLAIN_ANSWER_PLAN, Sampling(tokens)):
            stamps.extend([time.perf_counter()] * len(ev.tokens))
        return stamps

    start = time.perf_counter()
    runs = await asyncio.gather(*(one() for _ in range(n)))
    firsts = sorted(r[0] - start for r in runs)
    all_in = start + firsts[-1]
    end = max(r[-1] for r in runs)
    after = sum(1 for r in runs for t in r if t > all_in)
    return {"ttft_p50_s": round(firsts[len(firsts) // 2], 3), "ttft_max_s": round(firsts[-1], 3),
            "tokens_s": round(after / max(1e-9, end - all_in), 1)}  # fmt: skip


async def _rows(ctx: Any) -> list[dict]:
    from PIL import Image

    from service.engine.answering import user_message
    from service.engine.continuous import ContinuousEngine
    from service.engine.generation import GenerationEngine
    from service.engine.kv_slots import kv_bytes_per_token
    from tests.llava.conftest import make_backbone

    bb = make_backbone(0) if ctx.dry else llava_7b_shaped(ctx)
    bb.eos_ids = frozenset()  # random weights: never stop early, every stream runs its tokens
    lm, head = bb.lm, bb.model.lm_head.weight
    weight_bytes = sum(p.numel() * p.element_size() for n, p in lm.named_parameters()
                       if "embed_tokens" not in n) + head.numel() * head.element_size()  # fmt: skip
    kv_per_token = kv_bytes_per_token(lm.config, bb.dtype)
    side = bb.processor.image_processor.crop_size["height"]
    pixels = bb.pixel_values([Image.new("RGB", (side, side), (120, 60, 200))]).cpu()
    ids = bb.encode_chat(user_message("describe the image in detail.", True), 1, 0)
    tokens = 8 if ctx.dry else 64
    streams = (1, 2) if ctx.dry else (1, 8, 32, 64)
    max_len = min(bb.max_positions, len(ids) + tokens + 16)
    rows: list[dict] = []
    for kind in ("continuous", "static"):
        if kind == "continuous":
            engine: Any = ContinuousEngine(bb, slots=max(streams), max_len=max_len,
                                           step_tokens=2048)  # fmt: skip
        else:
            engine = GenerationEngine(bb, max_batch_size=max(streams), max_wait_ms=50)
        await engine.start()
        try:
            for n in streams:
                if ctx.left() < 20:
                    rows.append({"engine": kind, "streams": n, "skipped": f"{ctx.left():.0f} s"})
                    continue
                await _cell(engine, n, ids, pixels, 2)  # warm this batch size
                got = await _cell(engine, n, ids, pixels, tokens)
                step_bytes = weight_bytes + n * kv_per_token * (len(ids) + tokens // 2)
                rows.append({"engine": kind, "streams": n, "bytes_per_step": step_bytes, **got})
        finally:
            await engine.stop()
            del engine
            if ctx.cuda:
                torch.cuda.empty_cache()
    return rows


def issue21(ctx: Any) -> str:
    """Decode tokens/s and TTFT per engine and stream count, against the bandwidth bound."""
    from bench.gpu import bandwidth, md

    rows = asyncio.run(_rows(ctx))
    bw = ctx.results.get("environment", {}).get("bandwidth_gb_s", 0) * 1e9 or bandwidth(ctx.device)
    for r in rows:
        if "tokens_s" in r:
            r["bound_tokens_s"] = round(r["streams"] / (r["bytes_per_step"] / bw), 1)
            r["of_bound"] = round(r["tokens_s"] / r["bound_tokens_s"], 3)
    ctx.results["issue21"] = {"bandwidth_gb_s": round(bw / 1e9, 1), "rows": rows}
    header = ["engine", "streams", "decode tokens/s", "bound tokens/s", "of bound",
              "TTFT p50 s", "TTFT max s", "MB read per step"]  # fmt: skip
    table = [
        [r["engine"], r["streams"], "skipped: " + r["skipped"]] if "skipped" in r else
        [r["engine"], r["streams"], r["tokens_s"], r["bound_tokens_s"], r["of_bound"],
         r["ttft_p50_s"], r["ttft_max_s"], round(r["bytes_per_step"] / 1e6)]
        for r in rows
    ]  # fmt: skip
    return md(header, table) + (
        f"\n\nbound = streams / ((LM weights + KV bytes) / {bw / 1e9:.0f} GB/s, measured copy)"
    )
