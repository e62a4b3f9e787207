"""The engine's own CPU per classify request, without HTTP or the wire: where a GPU host's
engine core goes (the issue-16 GPU run: served img/s fell short of the encoder, and the
rates over 1- and 8-image requests and two models fit ~2 ms of engine CPU per 8-image
request that does not overlap the GPU; docs/PERFORMANCE.md).

    .venv/bin/python bench/engine_cpu.py                      # tiny CLIP, ~1 min
    .venv/bin/python bench/engine_cpu.py --profile            # + the top functions
    .venv/bin/python bench/engine_cpu.py --device-ms 0.107 --concurrency 128
                     # the encoder replaced by a device that takes 0.107 ms an image (the
                     # H200's CUDA-graph ViT-B/16) and holds no CPU: served vs that ceiling

The in-process Engine (residency, batcher, zero-shot cache, the runtime) is driven by
`--concurrency` tasks, each sending `--per-request` preprocessed images under one CoOp
checkpoint. Printed: requests/s, the process's CPU ms per request, and the encoder's own CPU
ms for the same images (timed apart, one thread), so the difference is the engine's
bookkeeping per request: what a GPU host's engine core spends while the GPU waits.

`--device-ms` stands in for the GPU: the batcher's model call sleeps that long per image
(releasing the GIL, as a CUDA sync does) and returns random unit features. Printed then: the
served img/s against that device's ceiling (1000 / device-ms), which is the GPU run's
served/raw with HTTP and the wire taken away: what the engine's own serial path allows.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import Tensor

import prompts_store as ps
from bench.common import checkpoint_bytes
from bench.peers import model_backbone
from service.engine.core import start_engine
from service.engine.protocol import ClassifyWork
from service.settings import Settings


async def drive(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # CPU seconds then are the work, not idle spinning threads
    bb = model_backbone(args.model)
    store = ps.open_store(f"file://{tempfile.mkdtemp(prefix='bench-engine-')}")
    settings = Settings(runtime="torch", max_batch_size=32, local_jobs=False,
                        max_queue=100_000)  # fmt: skip
    size = bb.image_size
    images = torch.randn(args.per_request, 3, *size)
    async with start_engine(settings, bb, store) as engine:
        await engine.publish(checkpoint_bytes(bb, "coop", "coop", 10, seed=0), True)
        if args.device_ms:
            assert engine.classifier is not None
            engine.classifier.batcher._run = fake_device(args.device_ms, bb.embed_dim)

        async def one(end: float) -> int:
            done = 0
            while time.monotonic() < end:
                work = ClassifyWork(uuid.uuid4().hex, ("coop",), None, images, 5, 1e12)
                await engine.classify(work)
                done += 1
            return done

        await asyncio.gather(*(one(time.monotonic() + 1.0) for _ in range(args.concurrency)))
        prof = cProfile.Profile() if args.profile else None
        cpu, wall = time.process_time(), time.monotonic()
        if prof:
            prof.enable()
        end = wall + args.seconds
        done = sum(await asyncio.gather(*(one(end) for _ in range(args.concurrency))))
        if prof:
            prof.disable()
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    if args.device_ms:
        ceiling = 1000 / args.device_ms
        rate = done * args.per_request / wall
        print(f"| {args.model}, device {args.device_ms} ms/img | {args.per_request} | "
              f"{args.concurrency} | {done / wall:,.0f} | {1e3 * cpu / done:.3f} | "
              f"{rate:,.0f} img/s of {ceiling:,.0f} ({rate / ceiling:.2f}) | |")  # fmt: skip
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
        return
    # the encoder alone, the same images in the batches the traffic made (32 a batch)
    batch = torch.randn(32 - 32 % args.per_request, 3, *size)
    with torch.no_grad():
        bb.encode_image(batch)
        start, n = time.process_time(), 0
        while time.process_time() - start < 2.0:
            bb.encode_image(batch)
            n += 1
        enc = (time.process_time() - start) / (n * batch.shape[0]) * args.per_request
    per = cpu / done
    print(
        f"| {args.model} | {args.per_request} | {args.concurrency} | {done / wall:,.0f} | "
        f"{1e3 * per:.3f} | {1e3 * enc:.3f} | {1e3 * (per - enc):.3f} |"
    )
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


def fake_device(ms_per_image: float, dim: int) -> Callable[[Tensor, list[Any]], Tensor]:
    """A model call that takes a device's time and no CPU (sleep releases the GIL)."""

    def run(images: Tensor, plans: list[Any]) -> Tensor:
        time.sleep(ms_per_image * images.shape[0] / 1000)
        return F.normalize(torch.randn(images.shape[0], dim), dim=-1)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--per-request", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--device-ms", type=float, default=0.0, help="simulated device ms/image")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    print(
        "| model | img/request | in flight | requests/s | CPU ms/request | encoder CPU "
        "ms/request | engine bookkeeping ms/request |\n|---|---|---|---|---|---|---|"
    )
    asyncio.run(drive(args))


if __name__ == "__main__":
    main()
