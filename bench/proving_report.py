"""What the proving-ground CLIP sees on each domain: zero-shot accuracy (all, base and novel
halves), a linear probe on its frozen image features and a bias probe, 16 shots per class.

    .venv/bin/python bench/proving_report.py            # pre-trains on first use (cached)
    .venv/bin/python bench/proving_report.py --probe-epochs 0  # zero-shot only

The linear probe says whether the frozen features still tell a domain's classes apart (then a
prompt has something to work with); zero-shot says whether they still match the class names.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.backbones.clip import ClipBackbone
from service.prompts import get_method
from service.training import proving_ground as pg


def bias_probe(
    backbone: ClipBackbone, train: pg.Dataset, test: pg.Dataset, epochs: int = 30, lr: float = 3e-2
) -> tuple[float, float]:
    """A sanity probe, not the trainer: per-layer vision biases (the `bias` method), Adam on
    cross-entropy against the zero-shot class matrix, batches of 64; (accuracy before, after)."""
    method = get_method("bias")
    cfg = method.config({"towers": "vision"})
    bias = method.init(backbone, cfg, train.classnames)["vision_bias"].to(backbone.device)
    bias.requires_grad_(True)
    classes = pg.zero_shot_plan(backbone, train.classnames).classes
    assert classes is not None
    before = pg.plan_accuracy(backbone, pg.zero_shot_plan(backbone, test.classnames), test)
    opt = torch.optim.Adam([bias], lr=lr)
    gen = torch.Generator().manual_seed(0)
    images, labels = pg.to_model_input(train.images, backbone), train.labels.to(backbone.device)
    for _ in range(epochs):
        for idx in torch.randperm(len(train), generator=gen).split(64):
            feats = F.normalize(backbone.encode_image(images[idx], bias=bias).float(), dim=-1)
            loss = F.cross_entropy(backbone.logit_scale * feats @ classes.t(), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    tuned = method.materialize({"vision_bias": bias.detach()}, backbone, cfg, test.classnames)
    return before, pg.plan_accuracy(backbone, tuned, test)


def linear_probe(
    backbone: ClipBackbone, train: pg.Dataset, test: pg.Dataset, steps: int = 500
) -> float:
    """Test accuracy of a linear classifier (Adam, full batch) on frozen normalized features."""
    with torch.no_grad():
        f_train, f_test = (
            F.normalize(
                backbone.encode_image(pg.to_model_input(d.images, backbone)).float(), dim=-1
            )
            for d in (train, test)
        )
    head = torch.nn.Linear(f_train.shape[1], len(train.classnames))
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(steps):
        loss = F.cross_entropy(10 * head(f_train), train.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((head(f_test).argmax(-1) == test.labels).float().mean())


def report(recipe: pg.PretrainRecipe, cache_dir: str | None, probe_epochs: int) -> dict[str, Any]:
    """Pre-train (or load), then print and return the figures per domain."""
    torch.manual_seed(0)  # the linear probe's initialization
    r = recipe
    backbone = pg.build_backbone(cache_dir, r.steps, r.batch, r.seed, progress=print)
    out: dict[str, Any] = {"pretrain_seconds": float(pg.pretrain_info(backbone)["seconds"])}
    print(f"{backbone.fingerprint[:23]}: pre-trained {r} in {out['pretrain_seconds']:.1f} s")
    source = pg.make_dataset(pg.SOURCE, "test", seed=r.seed)
    held = source.subset([pg.CLASSNAMES.index(n) for n in pg.HELD_OUT], relabel=False)
    out["source"] = pg.zero_shot_accuracy(backbone, source)
    out["source_held_out"] = pg.zero_shot_accuracy(backbone, held)
    print(f"source: zero-shot {out['source']:.3f}, held-out pairs {out['source_held_out']:.3f}")
    for name in pg.TARGETS:
        test = pg.make_dataset(name, "test", seed=r.seed)
        row = {
            "all": pg.zero_shot_accuracy(backbone, test),
            "base": pg.zero_shot_accuracy(backbone, test.subset(test.base_classes())),
            "novel": pg.zero_shot_accuracy(backbone, test.subset(test.novel_classes())),
        }
        if probe_epochs:
            shots = pg.make_dataset(name, "train", per_class=16, seed=r.seed)  # 16 shots a class
            row["linear_probe"] = linear_probe(backbone, shots, test)
            row["bias_before"], row["bias_after"] = bias_probe(backbone, shots, test, probe_epochs)
        out[name] = row
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Pre-train (or load) the proving ground; report.")
    parser.add_argument("--cache-dir")
    defaults = {"steps": 400, "batch": 256, "seed": 0, "probe_epochs": 30}
    for name, default in defaults.items():  # --probe-epochs 0 skips the probes
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    recipe = pg.PretrainRecipe(steps=args.steps, batch=args.batch, seed=args.seed)
    report(recipe, args.cache_dir, args.probe_epochs)


if __name__ == "__main__":
    main()
