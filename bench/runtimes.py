"""Runtimes side by side: eager torch, ONNX fp32, ONNX int8 (random weights: speed does not
depend on them), each as a ratio to eager, and fp32 as a fraction of the compute ceiling.

    .venv/bin/python bench/runtimes.py --models ViT-B-32,ViT-B-16 --batches 1,8,32

The ceiling is this machine's measured fp32 matrix-multiply rate times the model's FLOPs per
image (counted with torch's FlopCounterMode), i.e. the images/s a perfect implementation of the
model's matmuls would reach.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import backbone
from service.engine.runtimes.base import TorchRuntime
from service.engine.runtimes.onnx import OnnxRuntime


def matmul_gflops(seconds: float = 3.0, n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def flops_per_image(bb) -> float:
    size = bb.visual.image_size
    hw = size if isinstance(size, tuple) else (size, size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        bb.encode_image(torch.randn(1, 3, *hw))
    return float(counter.get_total_flops())


def images_per_s(rt, images: torch.Tensor, seconds: float) -> float:
    rt.encode(images, None, None, "append")  # warm (and export)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 2:
        rt.encode(images, None, None, "append")
        count += 1
    return count * len(images) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="ViT-B-32,ViT-B-16")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--seconds", type=float, default=8)
    args = p.parse_args()
    gflops = matmul_gflops()
    print(
        f"fp32 matmul rate: {gflops:.1f} GFLOP/s, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        "| model | batch | eager img/s | ONNX fp32 img/s (x eager, % ceiling) | "
        "ONNX int8 img/s (x eager) | ceiling img/s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    with torch.no_grad(), tempfile.TemporaryDirectory() as cache:
        for model in args.models.split(","):
            bb = backbone(model)
            ceiling = gflops * 1e9 / flops_per_image(bb)
            eager, fp32 = TorchRuntime(bb), OnnxRuntime(bb, cache)
            int8 = OnnxRuntime(bb, cache, int8=True)
            size = bb.visual.image_size
            hw = size if isinstance(size, tuple) else (size, size)
            for batch in (int(b) for b in args.batches.split(",")):
                images = torch.randn(batch, 3, *hw)
                e = images_per_s(eager, images, args.seconds)
                f = images_per_s(fp32, images, args.seconds)
                q = images_per_s(int8, images, args.seconds)
                print(
                    f"| {model} | {batch} | {e:.1f} | {f:.1f} ({f / e:.2f}x, "
                    f"{100 * f / ceiling:.0f}%) | {q:.1f} ({q / e:.2f}x) | {ceiling:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
