"""bench/gpu.py's served sections and the other issues' hooks: issue 16 (served vs raw encoder)
and issue 21 (a LLaVA-1.5-7B-shaped decode against the bandwidth bound), written against
today's code (one process; the static generation batcher) so the first GPU run records the
baselines those issues are measured against; their owners extend them (front ends, continuous
batching) in place.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import time
from typing import Any

import httpx
import torch

from bench import peers as peers_mod
from bench.common import checkpoint_bytes
from bench.load import drive_procs
from bench.peers import Variant, model_backbone, photo_jpeg


def peer_args(ctx: Any, **over: Any) -> argparse.Namespace:
    """bench/peers.py's options for one of our sections."""
    args = peers_mod.parser().parse_args([])
    args.device, args.server_cpus, args.client_procs = ctx.device, ctx.server_cpus, ctx.client_procs
    args.var, args.start_timeout = ctx.var / "peers", max(30.0, min(600.0, ctx.left() - 10))
    args.var.mkdir(parents=True, exist_ok=True)
    for k, v in over.items():
        setattr(args, k, v)
    return args


def serving_env(ctx: Any, runtime: str | None = None) -> dict[str, str]:
    if not ctx.cuda:
        return {"PROMPTSERVE_RUNTIME": runtime or "torch"}
    return {"PROMPTSERVE_DEVICE": ctx.device, "PROMPTSERVE_PRECISION": "bf16",
            "PROMPTSERVE_RUNTIME": runtime or "cudagraph"}  # fmt: skip


def _b64(width: int, height: int) -> str:
    return base64.b64encode(photo_jpeg(width, height)).decode()


def _cell(got: dict) -> dict:
    return {"img_s": got["steady_ok_per_s"], "p50_ms": got.get("p50_ms"),
            "p99_ms": got.get("p99_ms"), "statuses": got["statuses"]}  # fmt: skip


# --- issue 19: served img/s with the images decoded on the GPU vs on the CPU -----------------
def served_decode(ctx: Any) -> list[dict]:
    args = peer_args(ctx, model=ctx.model("ViT-B-32"))
    weights, _ = peers_mod.save_weights(model_backbone(args.model), args.var, None)
    rows = []
    sizes = ((224, 224),) if ctx.dry else ((224, 224), (640, 480))
    for decode in ("gpu", "cpu"):
        env = {**serving_env(ctx), "PROMPTSERVE_IMAGE_DECODE": decode}
        proc, base, health = peers_mod.start(Variant(decode, "promptserve", env), args, weights,
                                             None, None)  # fmt: skip
        try:
            reason = httpx.get(base + health, timeout=10).json().get("image_decode")
            for w, h in sizes:
                body = {"images": [_b64(w, h)]}
                httpx.post(base + "/v1/embed", json=body, timeout=300).raise_for_status()
                got = drive_procs(base, [body], ctx.clients, ctx.phase(4), ctx.client_procs,
                                  path="/v1/embed")  # fmt: skip
                rows.append({"decode": decode, "reason": reason, "image": f"{w}x{h}",
                             "clients": ctx.clients, **_cell(got)})  # fmt: skip
        finally:
            peers_mod.stop(proc)
    return rows


def served_table(rows: list[dict]) -> str:
    from bench.gpu import md

    cpu = {r["image"]: r["img_s"] for r in rows if r["decode"] == "cpu"}
    return md(
        ["decode", "image", "clients", "img/s", "× cpu decode", "p50 ms", "p99 ms", "statuses"],
        [[r["decode"], r["image"], r["clients"], r["img_s"],
          f"{r['img_s'] / cpu[r['image']]:.2f}" if r["img_s"] and cpu.get(r["image"]) else "n/a",
          r["p50_ms"], r["p99_ms"], r["statuses"]] for r in rows],
    )  # fmt: skip


# --- issue 19: the peers table on this device ------------------------------------------------
def peers(ctx: Any) -> str:
    args = peer_args(ctx, model=ctx.model("ViT-B-32"), clients=f"32,{ctx.clients}")
    if ctx.dry:  # the code paths, not the figures: one cell, one round
        args.clients, args.images, args.rounds = str(ctx.clients), "224x224", 1
    n = len(peers_mod.variants(args.device))
    args.seconds = ctx.phase(4 * n)
    args.warmup = min(2.0, args.seconds / 2)
    rows = peers_mod.run(args)
    ctx.results["peers"] = rows
    return peers_mod.table(rows, f"device {ctx.device}, {args.seconds:.1f} s per cell")


# --- issue 16: served img/s vs the raw CUDA-graph bf16 encoder --------------------------------
def issue16(ctx: Any) -> str:
    """Today's single-process server against its own encoder's ceiling (the issue's targets:
    served >= 0.7x raw for ViT-B/16, >= 0.5x for ViT-B/32, 224x224 JPEG, >= 128 clients)."""
    from bench.gpu import md
    from bench.runtimes import interleaved
    from service.engine.runtimes.base import TorchRuntime

    rows: list[dict] = []
    models = ["tiny"] if ctx.dry else ["ViT-B-16", "ViT-B-32"]
    for model in models:
        if ctx.left() < 40:
            rows.append({"model": model, "skipped": f"{ctx.left():.0f} s left"})
            continue
        cpu = model_backbone(model)
        if ctx.cuda:
            from service.engine.runtimes.cudagraph import CudaGraphRuntime

            rt: Any = CudaGraphRuntime(ctx.on_device(cpu, torch.bfloat16), 32)
            rt.warm_up()
        else:
            rt = TorchRuntime(cpu)
        size = cpu.visual.image_size
        hw = size if isinstance(size, tuple) else (size, size)
        x = torch.randn(32, 3, *hw).to(ctx.device)
        with torch.no_grad():
            run = {"raw": lambda rt=rt, x=x: rt.encode(x, None, None, "append")}
            raw = interleaved(run, 32, ctx.phase(6), rounds=2)["raw"]
        del rt, x
        if ctx.cuda:
            torch.cuda.empty_cache()  # the server below needs the GPU to itself
        args = peer_args(ctx, model=model)
        weights, _ = peers_mod.save_weights(cpu, args.var, None)
        proc, base, _ = peers_mod.start(Variant(model, "promptserve", serving_env(ctx)), args,
                                        weights, None, None)  # fmt: skip
        try:
            blob = checkpoint_bytes(cpu, "coop", "coop", 10, seed=0)
            httpx.post(f"{base}/v1/checkpoints", files={"file": ("c", blob)}, timeout=300)
            body = {"checkpoint": "coop", "images": [_b64(224, 224)]}
            httpx.post(base + "/v1/classify", json=body, timeout=300).raise_for_status()
            drive_procs(base, [body], ctx.clients, 2, ctx.client_procs)  # warm
            got = drive_procs(base, [body], ctx.clients, ctx.phase(3), ctx.client_procs)
        finally:
            peers_mod.stop(proc)
        served = got["steady_ok_per_s"] or 0.0
        rows.append({"model": model, "raw_img_s": round(raw, 1), "clients": ctx.clients,
                     "served": _cell(got), "ratio": round(served / raw, 3)})  # fmt: skip
    ctx.results["issue16"] = rows
    return md(
        ["model", "raw CUDA-graph bf16 b32 img/s" if ctx.cuda else "raw eager img/s", "clients",
         "served img/s (classify, 224 JPEG)", "served / raw", "p50 ms", "p99 ms", "statuses"],
        [[r["model"], "skipped: " + r["skipped"]] if "skipped" in r else
         [r["model"], r["raw_img_s"], r["clients"], r["served"]["img_s"], r["ratio"],
          r["served"]["p50_ms"], r["served"]["p99_ms"], r["served"]["statuses"]] for r in rows],
    )  # fmt: skip


# --- issue 21: LLaVA-1.5-7B-shaped decode against the memory-bandwidth bound ------------------
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


def issue21(ctx: Any) -> str:
    from bench.gpu import bandwidth, md

    rows = asyncio.run(_decode_rows(ctx))
    bw = ctx.results.get("environment", {}).get("bandwidth_gb_s", 0) * 1e9 or bandwidth(ctx.device)
    for r in rows:
        if "tokens_s" in r:
            r["bound_tokens_s"] = round(r["streams"] / (r["bytes_per_step"] / bw), 1)
            r["of_bound"] = round(r["tokens_s"] / r["bound_tokens_s"], 3)
    ctx.results["issue21"] = {"bandwidth_gb_s": round(bw / 1e9, 1), "rows": rows}
    return (
        md(
            [
                "streams",
                "decode tokens/s",
                "bound tokens/s",
                "of bound",
                "TTFT s (whole batch)",
                "MB read per step",
            ],
            [
                [r["streams"], "skipped: " + r["skipped"]]
                if "skipped" in r
                else [
                    r["streams"],
                    r["tokens_s"],
                    r["bound_tokens_s"],
                    r["of_bound"],
                    r["ttft_s"],
                    round(r["bytes_per_step"] / 1e6),
                ]
                for r in rows
            ],
        )
        + f"\n\nbound = streams / ((LM weights + KV bytes) / {bw / 1e9:.0f} GB/s, measured copy)"
    )


async def _decode_rows(ctx: Any) -> list[dict]:
    from PIL import Image

    from service.engine.answering import user_message
    from service.engine.generation import GenerationEngine, Sampling
    from service.prompts.m2pt import PLAIN_ANSWER_PLAN as PLAIN_GEN_PLAN
    from tests.llava.conftest import make_backbone

    bb = make_backbone(0) if ctx.dry else llava_7b_shaped(ctx)
    bb.eos_ids = frozenset()  # random weights: never stop early, every stream runs its tokens
    lm = bb.lm
    weight_bytes = sum(p.numel() * p.element_size() for n, p in lm.named_parameters()
                       if "embed_tokens" not in n)  # fmt: skip
    head = bb.model.lm_head.weight
    weight_bytes += head.numel() * head.element_size()
    cfg = lm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = (
        2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * head.element_size()
    )
    side = bb.processor.image_processor.crop_size["height"]
    pixels = bb.pixel_values([Image.new("RGB", (side, side), (120, 60, 200))]).cpu()
    ids = bb.encode_chat(user_message("describe the image in detail.", True), 1, 0)
    tokens = 8 if ctx.dry else 64
    engine = GenerationEngine(bb, max_batch_size=64, max_wait_ms=50)
    await engine.start()
    rows: list[dict] = []
    try:
        for n in (1, 2) if ctx.dry else (1, 8, 32, 64):
            if ctx.left() < 20:
                rows.append({"streams": n, "skipped": f"{ctx.left():.0f} s left"})
                continue

            async def batch(k: int, n: int = n) -> float:
                start = time.perf_counter()
                await asyncio.gather(*(engine.complete(ids, pixels, PLAIN_GEN_PLAN,
                                                       Sampling(max_new_tokens=k))
                                       for _ in range(n)))  # fmt: skip
                return time.perf_counter() - start

            await batch(2)  # warm this batch size
            first = await batch(1)
            whole = await batch(tokens)
            rows.append({
                "streams": n, "ttft_s": round(first, 3),
                "tokens_s": round(n * (tokens - 1) / max(1e-9, whole - first), 1),
                "bytes_per_step": weight_bytes + n * kv_per_token * (len(ids) + tokens // 2),
            })  # fmt: skip
    finally:
        await engine.stop()
    return rows
