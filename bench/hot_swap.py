"""Hot swap under load: a client classifies continuously while new versions are activated.

    .venv/bin/python bench/hot_swap.py --model ViT-B-32 --swaps 5
    .venv/bin/python bench/hot_swap.py --store redis://127.0.0.1:6399/0   # a running redis

Reports requests made, requests failed, and per swap the time from `activate` returning to the
first response that carries the new version (target: zero failures, under 1 s).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import backbone, checkpoint_bytes, percentile
from prompts_store import open_store
from service.checkpoints.publish import publish
from service.engine.forward import classify
from service.engine.residency import Residency
from service.prompts.plans import Plan


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--model-config")
    p.add_argument("--store", help="store URL (default: a temporary file store)")
    p.add_argument("--method", default="maple")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--swaps", type=int, default=5)
    p.add_argument("--interval", type=float, default=1.5, help="seconds between swaps")
    args = p.parse_args()

    bb = backbone(args.model, args.model_config)
    tmp = tempfile.TemporaryDirectory()
    store = open_store(args.store or f"file://{tmp.name}/store")
    for name in store.names():
        if name == "hotswap":
            store.delete(name)
    blobs = [
        checkpoint_bytes(bb, "hotswap", args.method, args.classes, seed)
        for seed in range(args.swaps + 1)
    ]
    publish(store, bb, blobs[0])
    residency = Residency(store, bb, Plan)
    residency.start()
    size = bb.visual.image_size
    images = torch.randn(args.batch, 3, *(size if isinstance(size, tuple) else (size, size)))

    seen: list[tuple[float, int]] = []
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                resident = residency.resolve("hotswap")
                classify(bb, images, [resident.plan] * len(images))
                seen.append((time.monotonic(), resident.version))
            except Exception as exc:  # any failure counts
                failures.append(repr(exc))

    thread = threading.Thread(target=client)
    thread.start()
    time.sleep(args.interval)
    latencies = []
    for blob in blobs[1:]:
        version = publish(store, bb, blob).version
        activated = time.monotonic()
        deadline = activated + 10
        while time.monotonic() < deadline:
            first = next((t for t, v in list(seen) if v == version and t >= activated), None)
            if first is not None:
                latencies.append(first - activated)
                break
            time.sleep(0.005)
        else:
            latencies.append(float("inf"))
        time.sleep(args.interval)
    stop.set()
    thread.join()
    residency.close()
    store.close()

    print(
        f"model {args.model}, {args.method} with {args.classes} classes, batch {args.batch}, "
        f"store {args.store or 'file (temporary)'}"
    )
    print(f"requests: {len(seen) + len(failures)}, failed: {len(failures)}")
    print(
        "activation -> first response on the new version (s): "
        + ", ".join(f"{x:.3f}" for x in latencies)
    )
    print(
        f"max {max(latencies):.3f} s, p50 {percentile(latencies, 50):.3f} s, "
        f"swaps {residency.stats.swaps}, swap failures {residency.stats.swap_failures}"
    )
    if failures:
        print("first failure:", failures[0])


if __name__ == "__main__":
    main()
