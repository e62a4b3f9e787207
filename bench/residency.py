"""Residency capacity and cold-load latency of CoOp-sized and MaPLe-sized checkpoints.

    .venv/bin/python bench/residency.py --model ViT-B-16 --classes 10 --count 40 --budget-mib 1024

For each method: checkpoint file bytes, resident (materialized Plan) bytes, how many fit in the
budget, and the cold-load latency (store read + validation + materialization), p50 and p99.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import backbone, checkpoint_bytes, percentile
from prompts_store import open_store
from service.checkpoints.publish import publish
from service.engine.residency import Residency
from service.prompts.plans import Plan


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--model-config")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--count", type=int, default=40)
    p.add_argument("--budget-mib", type=int, default=1024)
    p.add_argument("--methods", default="coop,maple")
    args = p.parse_args()
    bb = backbone(args.model, args.model_config)
    budget = args.budget_mib * 2**20
    print(
        f"model {args.model}, {args.classes} classes per checkpoint, budget {args.budget_mib} "
        f"MiB, {args.count} cold loads each"
    )
    print("| method | checkpoint bytes | resident bytes | fit in budget | cold load p50 | p99 |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"file://{tmp}/store")
        for method in args.methods.split(","):
            blob = b""
            for i in range(args.count):
                blob = checkpoint_bytes(bb, f"{method}-{i}", method, args.classes, seed=i)
                publish(store, bb, blob)
            residency = Residency(store, bb, Plan, device_budget=budget, host_budget=0)
            times = []
            for i in range(args.count):
                start = time.perf_counter()
                resident = residency.resolve(f"{method}-{i}")
                times.append(time.perf_counter() - start)
            fits = budget // resident.nbytes
            print(
                f"| {method} | {len(blob):,} | {resident.nbytes:,} | {fits:,} | "
                f"{percentile(times, 50) * 1e3:.1f} ms | {percentile(times, 99) * 1e3:.1f} ms |"
            )
        store.close()


if __name__ == "__main__":
    main()
