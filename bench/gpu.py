"""ONE prepared GPU run: every GPU figure issues 16, 19 and 21 ask for, each section time-boxed.

    timeout 540 python3 -m bench.gpu --budget-s 500        # on the GPU machine, once
    .venv/bin/python -m bench.gpu --dry-run                # here: tiny models on the CPU (~2 min)

Sections run in this order and each starts only while enough of the budget is left (its phases
shrink to what is left); each prints a markdown table as it ends, and the JSON of everything so
far is rewritten after every section to $OUT/gpu.json (or --json), so a run killed by `timeout`
keeps what it measured. SIGTERM stops the servers it started.

  1. environment: GPU, versions, execution providers, nvJPEG, measured device memory bandwidth;
  2. cuda-tests: the CUDA-only tests (decode parity on the proving ground, ONNX CUDA EP, graphs);
  3. runtimes (19): eager / CUDA graphs / ONNX CUDA EP, parity to eager fp32 and img/s;
  4. decode (19): which JPEGs nvJPEG decodes like PIL; preprocess img/s GPU vs CPU; served img/s
     with PROMPTSERVE_IMAGE_DECODE=gpu vs cpu;
  5. issue16: served img/s vs the raw CUDA-graph bf16 encoder, ViT-B/16 and ViT-B/32, >= 128
     clients (today's single process: the baseline the front-end split is measured against);
  5b. frontends (16): bench/frontend.py's null-engine table for 1..12 front ends;
  6. peers (19): bench/peers.py's table on the GPU (Infinity only if it can be installed);
  7. issue21 (bench/gpu_llava.py): a LLaVA-1.5-7B-shaped random bf16 model, decode tokens/s at
     1/8/32/64 streams against the memory-bandwidth bound and time to first token, continuous
     vs static batching.

Preparing the GPU machine (it reaches no package index; see /work/.library/device/README.md):
carry the project's missing dependencies as cp312 wheels (`bash bench/gpu_wheels.sh` here fills
.whl/) and the proving-ground weights (var/proving_ground/*.safetensors, 21 MB; else section 2
pre-trains them first), then run, e.g.:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 timeout 540 python3 -m bench.gpu --budget-s 500
onnxruntime-gpu's wheel (255 MB) is over the 64 MiB a call may carry: without it section 3 says
so and measures eager and graphs only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import gpu_hooks, gpu_llava
from bench.peers import model_backbone

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Ctx:
    """What every section gets: the device, the clock, the knobs, and where results go."""

    device: str
    dry: bool
    deadline: float
    phase_s: float
    clients: int
    client_procs: int
    server_cpus: str
    var: Path
    out: Path | None
    results: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def phase(self, parts: int = 1) -> float:
        """Seconds for one measured phase: the default, or less when the budget is short."""
        return max(0.3, min(self.phase_s, self.left() / (3 * parts)))

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def model(self, name: str) -> str:
        return "tiny" if self.dry else name

    def on_device(self, bb: Any, dtype: torch.dtype = torch.float32) -> Any:
        model = copy.deepcopy(bb.model).to(self.device, dtype)
        return replace(bb, model=model, device=torch.device(self.device), dtype=dtype)

    def save(self) -> None:
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.results, indent=1, default=str))


def md(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table (numbers as given: each section rounds its own)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- 1. environment --------------------------------------------------------------------------
def environment(ctx: Ctx) -> str:
    import onnxruntime as ort
    import torchvision

    info: dict[str, Any] = {
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
        "cpus": os.cpu_count(), "device": ctx.device,
    }  # fmt: skip
    if ctx.cuda:
        info["gpu"] = torch.cuda.get_device_name(ctx.device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(ctx.device).total_memory
                                       / 2**30, 1)  # fmt: skip
    info["bandwidth_gb_s"] = round(bandwidth(ctx.device) / 1e9, 1)
    ctx.results["environment"] = info
    return md(["what", "value"], [[k, v] for k, v in info.items()])


def bandwidth(device: str, mib: int = 1024) -> float:
    """Bytes/s of a large device-to-device copy, read plus written (the decode bound's rate)."""
    n = (mib * 2**20) // 4 if device != "cpu" else 2**24
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    b.copy_(a)
    sync()
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    sync()
    return 2 * a.numel() * 4 * reps / (time.perf_counter() - start)


# --- 2. the CUDA-only tests ------------------------------------------------------------------
def cuda_tests(ctx: Ctx) -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
           "tests/engine/test_gpu_images.py", "tests/engine/test_runtimes.py",
           "tests/engine/test_cudagraph.py", "-k", "cuda or gpu"]  # fmt: skip
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              timeout=max(10, ctx.left() - 5))  # fmt: skip
        tail = (done.stdout + done.stderr).strip().splitlines()[-25:]
        rc: Any = done.returncode
    except subprocess.TimeoutExpired:
        tail, rc = ["timed out"], "timeout"
    ctx.results["cuda_tests"] = {"rc": rc, "tail": tail}
    return "```\n" + "\n".join(tail) + "\n```"


# --- 3. runtimes -----------------------------------------------------------------------------
def runtimes(ctx: Ctx) -> str:
    import onnxruntime as ort
    import torch.nn.functional as F

    from bench.runtimes import interleaved
    from service.engine.runtimes.base import TorchRuntime
    from service.engine.runtimes.onnx import OnnxRuntime

    cpu = model_backbone(ctx.model("ViT-B-32"))
    fp32 = ctx.on_device(cpu)
    rts: dict[str, Any] = {"eager fp32": TorchRuntime(fp32)}
    notes: list[str] = []
    if ctx.cuda:
        from service.engine.runtimes.cudagraph import CudaGraphRuntime

        half = ctx.on_device(cpu, torch.bfloat16)
        rts["eager bf16"] = TorchRuntime(half)
        for label, bb in (("CUDA graphs fp32", fp32), ("CUDA graphs bf16", half)):
            graphs = CudaGraphRuntime(bb, 32)
            graphs.warm_up()
            rts[label] = graphs
    if not ctx.cuda or "CUDAExecutionProvider" in ort.get_available_providers():
        label = "ONNX CUDA EP fp32" if ctx.cuda else "ONNX CPU EP fp32 (dry run)"
        rts[label] = OnnxRuntime(fp32, ctx.var / "onnx")
    else:
        notes.append("ONNX CUDA EP: skipped, onnxruntime here has no CUDAExecutionProvider "
                     f"({ort.get_available_providers()}); install onnxruntime-gpu")  # fmt: skip
    size = cpu.visual.image_size
    hw = size if isinstance(size, tuple) else (size, size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, *hw, generator=gen).to(ctx.device)
    bias = (torch.randn(8, cpu.vision_layers, cpu.vision_width, generator=gen) * 0.1).to(ctx.device)
    with torch.no_grad():
        ref = rts["eager fp32"].encode(x, None, bias, "append").float()
        parity = {}
        for name, rt in rts.items():
            got = rt.encode(x, None, bias, "append").float()
            parity[name] = (
                float((got - ref).abs().max()),
                float(F.cosine_similarity(got, ref).min()),
            )
        speed: dict[int, dict[str, float]] = {}
        for batch in (1, 8, 32):
            if ctx.left() < 10:
                notes.append(f"batch {batch}: out of time")
                break
            xb = torch.randn(batch, 3, *hw, generator=gen).to(ctx.device)
            runs = {
                n: (lambda rt=rt, xb=xb: rt.encode(xb, None, None, "append"))
                for n, rt in rts.items()
            }
            speed[batch] = interleaved(runs, batch, ctx.phase(3 * len(rts)) * len(runs), rounds=2)
    ctx.results["runtimes"] = {"parity": parity, "img_s": speed, "notes": notes}
    rows = [[n, f"{d:.1e}", f"{c:.5f}", *(f"{speed[b][n]:.0f}" for b in speed)]
            for n, (d, c) in parity.items()]  # fmt: skip
    head = ["runtime", "max abs diff vs eager fp32", "min cosine", *(f"img/s b{b}" for b in speed)]
    return md(head, rows) + "".join(f"\n\n{n}" for n in notes)


# --- 4. decode -------------------------------------------------------------------------------
def decode(ctx: Ctx) -> str:
    import io

    import numpy as np
    from PIL import Image

    from bench.peers import photo_jpeg
    from service.engine import gpu_images as gi
    from service.images import ImageLimits, decode_batch

    photo = Image.open(io.BytesIO(photo_jpeg(640, 480)))

    def enc(img: Image.Image, **kw: Any) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90, **kw)
        return buf.getvalue()

    kinds = {"baseline 4:2:0": enc(photo), "baseline 4:4:4": enc(photo, subsampling=0),
             "progressive": enc(photo, progressive=True), "greyscale": enc(photo.convert("L")),
             "CMYK": enc(photo.convert("CMYK"))}  # fmt: skip
    probe = {}
    for name, data in kinds.items():
        pil = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB")))
        try:
            got = gi.decode_jpegs([data], torch.device(ctx.device))[0].permute(1, 2, 0).cpu()
            diff = (got.int() - pil.int()).abs()
            probe[name] = (
                f"decoded: max |diff| {int(diff.max())}, mean {float(diff.float().mean()):.3f}"
            )
        except RuntimeError as err:
            probe[name] = f"refused: {str(err)[:120]}"
    cpu = model_backbone(ctx.model("ViT-B-32"))
    dev = ctx.on_device(cpu)
    images = gi.GpuImages(dev)
    limits = ImageLimits()
    rates: dict[str, dict[str, float]] = {}
    for w, h in ((224, 224), (640, 480)):
        datas = [photo_jpeg(w, h, seed=i) for i in range(32)]
        timed = {"device path": lambda datas=datas: images.decode(datas, limits),
                 "CPU path, one thread": lambda datas=datas: decode_batch(
                     datas, limits, cpu.preprocess, max_request_pixels=2**40)}  # fmt: skip
        rates[f"{w}x{h}"] = {}
        for name, fn in timed.items():
            fn()
            if ctx.cuda:
                torch.cuda.synchronize()
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < ctx.phase(8) or n == 0:
                fn()
                n += 1
            if ctx.cuda:
                torch.cuda.synchronize()
            rates[f"{w}x{h}"][name] = 32 * n / (time.perf_counter() - start)
    served = gpu_hooks.served_decode(ctx)
    ctx.results["decode"] = {"probe": probe, "preprocess_img_s": rates, "served": served}
    out = md(
        ["JPEG kind", f"decode_jpeg on {ctx.device} vs PIL"], [[k, v] for k, v in probe.items()]
    )
    out += "\n\n" + md(
        ["image", "path", "img/s (decode+resize+normalize, batch 32)"],
        [[i, n, f"{r:.0f}"] for i, d in rates.items() for n, r in d.items()],
    )
    return out + "\n\n" + gpu_hooks.served_table(served)


SECTIONS = {  # name -> (function, the least budget worth starting it with, s)
    "environment": (environment, 5),
    "cuda-tests": (cuda_tests, 60),
    "runtimes": (runtimes, 45),
    "decode": (decode, 60),
    "issue16": (gpu_hooks.issue16, 90),
    "frontends": (gpu_hooks.frontends, 60),
    "peers": (gpu_hooks.peers, 90),
    "issue21": (gpu_llava.issue21, 90),
}


def main() -> int:
    p = argparse.ArgumentParser(description="the prepared GPU run (see the module docstring)")
    p.add_argument("--budget-s", type=float, default=500)
    p.add_argument("--dry-run", action="store_true", help="tiny models, CPU, short phases")
    p.add_argument("--device", default=None, help="default cuda (cpu with --dry-run)")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--phase-s", type=float, default=None, help="measured s per phase")
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (>= 128)")
    p.add_argument("--client-procs", type=int, default=None)
    p.add_argument("--server-cpus", default=None, help="taskset list for the servers")
    p.add_argument("--json", type=Path, default=None, help="default $OUT/gpu.json")
    p.add_argument("--var", type=Path, default=None, help="weights, stores, ONNX cache")
    a = p.parse_args()
    dry = a.dry_run
    cores = os.cpu_count() or 2
    out = a.json or (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else None)
    ctx = Ctx(
        device=a.device or ("cpu" if dry else "cuda"), dry=dry,
        deadline=time.monotonic() + a.budget_s, phase_s=a.phase_s or (1.0 if dry else 6.0),
        clients=a.clients or (16 if dry else 128),
        client_procs=a.client_procs or (1 if dry else max(1, cores // 4)),
        server_cpus=a.server_cpus or ("0" if dry or cores < 4 else f"0-{cores // 2 - 1}"),
        var=a.var or REPO / "var" / ("gpu-dry" if dry else "gpu"), out=out,
    )  # fmt: skip
    ctx.var.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # finally-blocks stop the servers
    failed = 0
    for name in a.sections.split(","):
        fn, least = SECTIONS[name]
        if ctx.left() < least:
            ctx.results[name] = {"skipped": f"{ctx.left():.0f} s left, needs >= {least}"}
            print(f"\n## {name}: skipped ({ctx.left():.0f} s left)", flush=True)
            continue
        start = time.monotonic()
        print(f"\n## {name}", flush=True)
        try:
            print(fn(ctx), flush=True)
        except Exception as err:  # one broken section must not cost the others their figures
            failed += 1
            ctx.results[name] = {"error": f"{type(err).__name__}: {err}"}
            print(f"FAILED: {type(err).__name__}: {err}", flush=True)
        print(f"({time.monotonic() - start:.0f} s)", flush=True)
        ctx.save()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
