"""Served throughput and latency over HTTP against a real `promptserve serve` on loopback.

    .venv/bin/python bench/serve.py --model ViT-B-32 --seconds 20

Prints, in one run on one machine and model (random weights: speed does not depend on them):
  1. raw in-process batched image encoder (batch 32), images/s;
  2. served images/s at 32 concurrent clients (one image per request) to one checkpoint,
     and its ratio to (1);
  3. served images/s with the same clients spread over 64 distinct MaPLe checkpoints of one
     signature, and its ratio to (2);
  4. latency p50/p99 at batch 1 (one client) and under load (32 clients);
  5. the naive service a user would write (text tower over the class prompts on every request,
     one request at a time) vs the served path, at 100 classes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import backbone, checkpoint_bytes, classnames, free_port, jpeg_b64, percentile
from service.engine.forward import encode
from service.prompts import get_method

REPO = Path(__file__).resolve().parents[1]


def raw_encoder(bb, batch: int, seconds: float) -> float:
    """Images/s of the batched image encoder in-process (the compute ceiling of serving)."""
    plan = get_method("zeroshot").materialize({}, bb, get_method("zeroshot").config(), ["x"])
    size = bb.visual.image_size
    hw = size if isinstance(size, tuple) else (size, size)
    images = torch.randn(batch, 3, *hw)
    encode(bb, images, [plan] * batch)  # warm
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        encode(bb, images, [plan] * batch)
        n += batch
    return n / (time.perf_counter() - start)


def naive(bb, n_classes: int, requests: int) -> tuple[float, list[float]]:
    """Per request: tokenize and encode all class prompts, encode the image, one at a time."""
    names = [f"a photo of a {c}." for c in classnames(n_classes)]
    size = bb.visual.image_size
    hw = size if isinstance(size, tuple) else (size, size)
    latencies = []
    start = time.perf_counter()
    for _ in range(requests):
        t = time.perf_counter()
        with torch.no_grad():
            text = bb.model.encode_text(bb.tokenizer(names), normalize=True)
            img = bb.model.encode_image(torch.randn(1, 3, *hw), normalize=True)
            (100 * img @ text.t()).softmax(-1).topk(5)
        latencies.append(time.perf_counter() - t)
    return requests / (time.perf_counter() - start), latencies


async def load(base: str, bodies: list[dict], clients: int, seconds: float) -> dict:
    """`clients` concurrent clients, each sending one request after another for `seconds`."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    images = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:

        async def one(i: int) -> None:
            nonlocal images
            k = i
            while time.perf_counter() < stop:
                body = bodies[k % len(bodies)]
                k += clients
                t = time.perf_counter()
                r = await client.post("/v1/classify", json=body)
                latencies.append(time.perf_counter() - t)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    images += len(body["images"])

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    return {
        "images_s": images / elapsed,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "statuses": statuses,
        "requests": len(latencies),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--checkpoints", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5)
    p.add_argument("--frontends", default="1", help="PROMPTSERVE_FRONTENDS of the server")
    p.add_argument("--host-budget-mib", type=int, default=2048, help="resident plans, host")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    bb = backbone(args.model)
    tmp = Path(tempfile.mkdtemp())
    weights = tmp / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(weights))

    print(
        f"model {args.model} (random weights), {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, batching: max_batch_size {args.max_batch_size}, "
        f"max_wait_ms {args.max_wait_ms}, {args.seconds:.0f} s per phase, "
        f"front ends {args.frontends}"
    )
    raw = raw_encoder(bb, 32, args.seconds)
    print(f"1. raw batched encoder, in-process, batch 32: {raw:.1f} images/s")

    port = free_port()
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--model", args.model, "--pretrained",
         str(weights), "--store", f"file://{tmp / 'store'}", "--port", str(port),
         "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
         "--frontends", args.frontends],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PROMPTSERVE_LOCAL_JOBS": "false",
             "PROMPTSERVE_HOST_BUDGET_MIB": str(args.host_budget_mib)},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit((tmp / "server.log").read_text())
            time.sleep(0.5)
        image = jpeg_b64(224)
        names = [f"maple-{i}" for i in range(args.checkpoints)]
        for i, name in enumerate(["single", *names]):
            blob = checkpoint_bytes(bb, name, "maple", 10, seed=i)
            r = httpx.post(f"{base}/v1/checkpoints", files={"file": ("c", blob)}, timeout=120)
            r.raise_for_status()
        blob = checkpoint_bytes(bb, "coop100", "coop", 100, seed=0)
        httpx.post(f"{base}/v1/checkpoints", files={"file": ("c", blob)}, timeout=120)
        single = [{"checkpoint": "single", "images": [image]}]
        mixed = [{"checkpoint": n, "images": [image]} for n in names]
        for body in [*mixed, *single, {"checkpoint": "coop100", "images": [image]}]:
            httpx.post(f"{base}/v1/classify", json=body, timeout=120).raise_for_status()

        one = asyncio.run(load(base, single, args.clients, args.seconds))
        print(
            f"2. served, {args.clients} clients, one checkpoint: {one['images_s']:.1f} "
            f"images/s = {one['images_s'] / raw:.2f} x raw; statuses {one['statuses']}"
        )
        mix = asyncio.run(load(base, mixed, args.clients, args.seconds))
        print(
            f"3. served, {args.clients} clients over {args.checkpoints} MaPLe checkpoints: "
            f"{mix['images_s']:.1f} images/s = {mix['images_s'] / one['images_s']:.2f} x one "
            f"checkpoint; statuses {mix['statuses']}"
        )
        solo = asyncio.run(load(base, single, 1, args.seconds / 2))
        print(
            f"4. latency batch 1 (one client): p50 {solo['p50'] * 1e3:.0f} ms, p99 "
            f"{solo['p99'] * 1e3:.0f} ms; under load ({args.clients} clients): p50 "
            f"{one['p50'] * 1e3:.0f} ms, p99 {one['p99'] * 1e3:.0f} ms"
        )
        ours = asyncio.run(
            load(base, [{"checkpoint": "coop100", "images": [image]}], args.clients, args.seconds)
        )
        ours1 = asyncio.run(
            load(base, [{"checkpoint": "coop100", "images": [image]}], 1, args.seconds / 2)
        )
        naive_rps, naive_lat = naive(bb, 100, 20)
        print(
            f"5. 100 classes: naive {naive_rps:.2f} requests/s (p50 "
            f"{percentile(naive_lat, 50) * 1e3:.0f} ms); served, one client "
            f"{ours1['images_s']:.2f} requests/s (p50 {ours1['p50'] * 1e3:.0f} ms) = "
            f"{ours1['images_s'] / naive_rps:.1f} x; served, {args.clients} clients "
            f"{ours['images_s']:.2f} requests/s = {ours['images_s'] / naive_rps:.1f} x"
        )
        print(
            json.dumps(
                {
                    "raw": raw,
                    "one": one,
                    "mixed": mix,
                    "solo": solo,
                    "coop100": ours,
                    "coop100_one_client": ours1,
                    "naive_rps": naive_rps,
                },
                default=str,
            )
        )
    finally:
        server.terminate()
        server.wait(60)
        log.close()


if __name__ == "__main__":
    main()
