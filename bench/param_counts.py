"""Trainable parameters of every prompt method with its published defaults, on a backbone.

    .venv/bin/python bench/param_counts.py --model ViT-B-16

Builds the architecture with random weights (parameter shapes do not depend on the weights), so
it needs no download. Prints a Markdown table (used in docs/METHODS.md).
"""

from __future__ import annotations

import argparse
import math

from service.backbones.clip import load_clip
from service.prompts import get_method
from service.prompts.registry import on_backbone

CLASSES = 10  # class-specific parameters (CoOp CSC) scale with the classes; defaults have none


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--model-config", default=None)
    args = parser.parse_args()
    backbone = load_clip(args.model, "none", model_config=args.model_config)
    classnames = [f"class {i}" for i in range(CLASSES)]
    print(f"| method | tensors (shape) | parameters on {backbone.model_name} |")
    print("|---|---|---:|")
    for name in on_backbone(backbone.kind):  # the methods of CLIP backbones, in name order
        method = get_method(name)
        cfg = method.config()
        shapes = method.shapes(backbone, cfg, classnames)
        total = sum(math.prod(s) for s in shapes.values())
        desc = ", ".join(f"`{k}` {list(s)}" for k, s in shapes.items()) or "none"
        print(f"| {name} | {desc} | {total:,} |")


if __name__ == "__main__":
    main()
