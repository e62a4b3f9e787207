"""The proving-ground table of docs/METHODS.md: zero-shot and every method, base / novel / HM on
shifted domains, mean over seeds, with trainable parameters and training time.

    .venv/bin/python bench/proving_table.py --domains gray,noise,dusk,falsecolour --seeds 0,1,2

Every figure is reproducible from the seeds (the backbone is pre-trained with seed 0 and cached).
The recipe is the short one of the tests and the demo (the published recipes are tuned for
ViT-B/16 on real data): AdamW, lr 0.03, 40 epochs, batch 32, no warm-up, 16 shots per base class.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prompts_store import open_store
from service.prompts import get_method
from service.prompts.registry import trainable
from service.training import proving_ground as pg
from service.training.datasets import load_data
from service.training.evaluate import harmonic_mean
from service.training.recipes import PROVING_CONFIG, PROVING_RECIPE
from service.training.runs import DatasetSpec, TrainSpec, run

FAST, CONFIG = PROVING_RECIPE, PROVING_CONFIG


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--domains", default="gray,noise,dusk,falsecolour")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(trainable("classify")))
    args = p.parse_args()
    bb = pg.build_backbone()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = pg.CLASSNAMES[:16]
    rows = []
    for domain in args.domains.split(","):
        test = pg.make_dataset(domain, "test", per_class=50, seed=0)
        b = pg.zero_shot_accuracy(bb, test.subset(test.base_classes()))
        n = pg.zero_shot_accuracy(bb, test.subset(test.novel_classes()))
        rows.append((domain, "zeroshot", 0, b, n, harmonic_mean(b, n), 0.0))
        for method in args.methods.split(","):
            m = get_method(method)
            cfg = m.config(CONFIG.get(method, {}))
            params = sum(math.prod(s) for s in m.shapes(bb, cfg, names).values())
            results = []
            with tempfile.TemporaryDirectory() as tmp:
                store = open_store(f"file://{tmp}/store")
                for seed in seeds:
                    spec = TrainSpec(
                        name=f"{method}-{seed}",
                        method=method,
                        shots=16,
                        seed=seed,
                        base_to_novel=True,
                        recipe=FAST,
                        method_config=CONFIG.get(method, {}),
                        dataset=DatasetSpec(kind="proving_ground", domain=domain),
                    )
                    r = run(spec, bb, store, load_data)
                    results.append(
                        (
                            r.metrics["base"]["accuracy"],
                            r.metrics["novel"]["accuracy"],
                            r.result.seconds,
                        )
                    )
                store.close()
            b = mean(x[0] for x in results)
            n = mean(x[1] for x in results)
            rows.append(
                (domain, method, params, b, n, harmonic_mean(b, n), mean(x[2] for x in results))
            )
            print(f"{domain} {method}: base {b:.3f} novel {n:.3f}", file=sys.stderr, flush=True)
    print(
        f"Proving ground, {len(seeds)} seeds ({args.seeds}), 16 shots per base class, "
        "accuracy in %:"
    )
    print("| domain | method | trainable params | base | novel | HM | train time (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for domain, method, params, b, n, hm, secs in rows:
        print(
            f"| {domain} | {method} | {params:,} | {100 * b:.1f} | {100 * n:.1f} | "
            f"{100 * hm:.1f} | {secs:.1f} |"
        )


if __name__ == "__main__":
    main()
