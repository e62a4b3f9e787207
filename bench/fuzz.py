"""The longer API fuzz run: every operation of the OpenAPI document, schema-valid and
schema-violating requests, against the app on the tiny test backbone (in-process, ASGI).

    .venv/bin/python bench/fuzz.py --examples 300

Prints, per operation and mode, the requests sent and their statuses, then every failure
(a 5xx, or a response off the documented schema); exits 1 if there was any. The checks are
those of the bounded test in `make test` (tests/reliability/fuzz.py says which and why).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prompts_store import open_store
from service.app import create_app
from service.backbones.clip import load_clip
from service.checkpoints.publish import publish
from tests.conftest import TINY_CONFIG
from tests.engine.test_residency import checkpoint
from tests.reliability.fuzz import Tally, fuzz_operation, fuzz_settings, plan, shutdown


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=300, help="per operation and mode")
    p.add_argument("--seed", type=int, default=None, help="default: derandomized (repeatable)")
    args = p.parse_args()
    torch.manual_seed(0)
    backbone = load_clip("", "none", model_config=TINY_CONFIG)
    tmp = tempfile.TemporaryDirectory()
    url = f"file://{tmp.name}/store"
    store = open_store(url)
    publish(store, backbone, checkpoint(backbone, name="eurosat"))
    store.close()
    app = create_app(fuzz_settings(url), backbone=backbone)
    total, failures, start = Tally(), [], time.perf_counter()
    try:
        for label, variant, operation, mode in plan():
            tally = Tally()
            fuzz_operation(app, operation, mode, args.examples, tally, seed=args.seed)
            for status, n in tally.statuses.items():
                total.statuses[status] = total.statuses.get(status, 0) + n
            failures += tally.failures
            statuses = dict(sorted(tally.statuses.items()))
            note = " (nothing to negate)" if tally.unsatisfiable else ""
            print(f"{label:40s} {variant:8s} {tally.requests:5d} requests {statuses}{note}")
    finally:
        shutdown(app)
    elapsed = time.perf_counter() - start
    print(
        f"\n{total.requests} requests in {elapsed:.0f} s; statuses "
        f"{dict(sorted(total.statuses.items()))}; 5xx other than documented 503: "
        f"{sum(n for s, n in total.statuses.items() if s >= 500 and s != 503)}; "
        f"failures {len(failures)}"
    )
    shown: set[str] = set()
    for failure in failures:  # one of each kind: operation, variant and the check that failed
        kind = "\n".join(failure.splitlines()[:3])
        if kind not in shown:
            shown.add(kind)
            print("\n" + failure)
    print(json.dumps({"requests": total.requests, "failures": len(failures)}))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
