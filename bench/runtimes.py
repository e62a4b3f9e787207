"""Runtimes side by side, in one run on one machine (random weights: speed does not depend on them).

    .venv/bin/python bench/runtimes.py --models ViT-B-32,ViT-B-16 --batches 1,8,32
    .venv/bin/python bench/runtimes.py --device cuda --batches 1,8,32   # on a GPU

CPU: eager torch, ONNX fp32, ONNX int8, each as a ratio to eager, and the fp32 runtimes as a
fraction of the compute ceiling. GPU: eager vs CUDA graphs in fp32 and in half precision.

The ceiling is this machine's measured fp32 matrix-multiply rate (the best of square products
and a ViT-B's linear-layer shapes, torch on all its threads) times the model's FLOPs per image:
the images/s a perfect implementation of the model's arithmetic would reach. FLOPs are counted
by torch's `FlopCounterMode` with the fused multi-head-attention fast path off: that fast path
is one opaque kernel the counter does not see, and with it on a third of a ViT's FLOPs go
uncounted (ViT-B/32: 5.9 instead of 8.8 GFLOP per image).

Timing: the runtimes of one batch size are timed in interleaved rounds and the best round of
each is kept, so a burst of load from another process penalises no runtime in particular.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import backbone
from service.engine.runtimes.base import TorchRuntime
from service.engine.runtimes.onnx import OnnxRuntime, physical_cores


def matmul_gflops(seconds: float = 1.0, device: str = "cpu") -> float:
    """The best fp32 rate over square products and a ViT-B's own linear-layer shapes (1600 tokens,
    width 768, MLP 3072), two rounds each: the ceiling must be a rate this machine can reach,
    not one a cold or unlucky first measurement happened to give."""
    shapes = [(1024, 1024, 1024), (2048, 2048, 2048), (1600, 768, 3072), (1600, 3072, 768)]
    best = 0.0
    for _ in range(2):
        for m, k, n in shapes:
            a, b = torch.randn(m, k, device=device), torch.randn(n, k, device=device)
            torch.nn.functional.linear(a, b)
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                torch.nn.functional.linear(a, b)
                count += 1
            if device != "cpu":
                torch.cuda.synchronize()
            best = max(best, 2 * m * k * n * count / (time.perf_counter() - start) / 1e9)
    return best


def flops_per_image(bb) -> float:
    size = bb.visual.image_size
    hw = size if isinstance(size, tuple) else (size, size)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # count attention's matmuls too
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            bb.encode_image(torch.randn(1, 3, *hw, device=bb.device))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return float(counter.get_total_flops())


def interleaved(runs: dict[str, Callable[[], object]], batch: int, seconds: float, rounds: int = 3):
    """images/s of each run: best of `rounds` interleaved rounds of `seconds / rounds` each."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for run in runs.values():
        run()  # warm (and export / capture)
    sync()
    best = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, run in runs.items():
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / rounds or count < 2:
                run()
                count += 1
            sync()
            best[name] = max(best[name], count * batch / (time.perf_counter() - start))
    return best


def cpu_table(args, gflops: float) -> None:
    print(
        "| model | batch | eager img/s (% ceiling) | ONNX fp32 img/s (x eager, % ceiling) | "
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
                x = torch.randn(batch, 3, *hw)
                r = interleaved(
                    {
                        name: (lambda rt=rt, x=x: rt.encode(x, None, None, "append"))
                        for name, rt in (("eager", eager), ("fp32", fp32), ("int8", int8))
                    },
                    batch,
                    args.seconds,
                )
                e, f, q = r["eager"], r["fp32"], r["int8"]
                print(
                    f"| {model} | {batch} | {e:.1f} ({100 * e / ceiling:.0f}%) | {f:.1f} "
                    f"({f / e:.2f}x, {100 * f / ceiling:.0f}%) | {q:.1f} ({q / e:.2f}x) | "
                    f"{ceiling:.1f} |",
                    flush=True,
                )


def gpu_table(args, gflops: float) -> None:
    import copy
    from dataclasses import replace

    from service.engine.runtimes.cudagraph import CudaGraphRuntime

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.half]
    print(
        f"| model | batch | eager fp32 img/s | CUDA graphs fp32 (x eager) | eager {args.half} | "
        f"CUDA graphs {args.half} (x eager {args.half}, x eager fp32) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for model in args.models.split(","):
            cpu = backbone(model)
            rts = {}
            for label, dtype in (("fp32", torch.float32), (args.half, half)):
                bb = replace(
                    cpu,
                    model=copy.deepcopy(cpu.model).to("cuda", dtype),
                    device=torch.device("cuda"),
                    dtype=dtype,
                )
                graphs = CudaGraphRuntime(bb, max(int(b) for b in args.batches.split(",")))
                graphs.warm_up()
                rts[f"eager {label}"], rts[f"graphs {label}"] = TorchRuntime(bb), graphs
            size = cpu.visual.image_size
            hw = size if isinstance(size, tuple) else (size, size)
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, 3, *hw, device="cuda")
                r = interleaved(
                    {
                        n: (lambda rt=rt, x=x: rt.encode(x, None, None, "append"))
                        for n, rt in rts.items()
                    },
                    batch,
                    args.seconds,
                )
                e, g = r["eager fp32"], r["graphs fp32"]
                eh, gh = r[f"eager {args.half}"], r[f"graphs {args.half}"]
                print(
                    f"| {model} | {batch} | {e:.0f} | {g:.0f} ({g / e:.2f}x) | {eh:.0f} | "
                    f"{gh:.0f} ({gh / eh:.2f}x, {gh / e:.2f}x) |",
                    flush=True,
                )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="ViT-B-32,ViT-B-16")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--seconds", type=float, default=9, help="per runtime and batch size")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--half", default="bf16", choices=["bf16", "fp16"])
    args = p.parse_args()
    gflops = matmul_gflops(device=args.device)
    print(
        f"fp32 matmul rate: {gflops:.1f} GFLOP/s on {args.device}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, {physical_cores()} ORT threads"
    )
    (gpu_table if args.device == "cuda" else cpu_table)(args, gflops)


if __name__ == "__main__":
    main()
