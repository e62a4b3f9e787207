"""bench/gpu.py's served sections and the other issues' hooks: issue 16 (served vs raw encoder),
written against today's code (one process) so the first GPU run records the baseline that issue
is measured against. Issue 21's section (LLaVA-1.5-7B-shaped decode) is bench/gpu_llava.py.
"""

from __future__ import annotations

import argparse
import base64
import json
from typing import Any

import httpx
import torch

from bench import peers as peers_mod
from bench.common import checkpoint_bytes
from bench.load import drive_procs
from bench.peers import Variant, model_backbone, photo_jpeg


def peer_args(ctx: Any, **over: Any) -> argparse.Namespace:
    """bench/peers.py's options for one of our sections."""
    args = peers_mod.parser().parse_args([])
    args.device, args.server_cpus, args.client_procs = ctx.device, ctx.server_cpus, ctx.client_procs
    args.var, args.start_timeout = ctx.var / "peers", max(30.0, min(600.0, ctx.left() - 10))
    args.var.mkdir(parents=True, exist_ok=True)
    for k, v in over.items():
        setattr(args, k, v)
    return args


def serving_env(ctx: Any, runtime: str | None = None) -> dict[str, str]:
    if not ctx.cuda:
        return {"PROMPTSERVE_RUNTIME": runtime or "torch"}
    return {"PROMPTSERVE_DEVICE": ctx.device, "PROMPTSERVE_PRECISION": "bf16",
            "PROMPTSERVE_RUNTIME": runtime or "cudagraph"}  # fmt: skip


def _b64(width: int, height: int) -> str:
    return base64.b64encode(photo_jpeg(width, height)).decode()


def _cell(got: dict) -> dict:
    return {"img_s": got["steady_ok_per_s"], "p50_ms": got.get("p50_ms"),
            "p99_ms": got.get("p99_ms"), "statuses": got["statuses"]}  # fmt: skip


# --- issue 19: served img/s with the images decoded on the GPU vs on the CPU -----------------
def served_decode(ctx: Any) -> list[dict]:
    args = peer_args(ctx, model=ctx.model("ViT-B-32"))
    weights, _ = peers_mod.save_weights(model_backbone(args.model), args.var, None)
    rows = []
    sizes = ((224, 224),) if ctx.dry else ((224, 224), (640, 480))
    for decode in ("gpu", "cpu"):
        env = {**serving_env(ctx), "PROMPTSERVE_IMAGE_DECODE": decode}
        proc, base, health = peers_mod.start(Variant(decode, "promptserve", env), args, weights,
                                             None, None)  # fmt: skip
        try:
            reason = httpx.get(base + health, timeout=10).json().get("image_decode")
            for w, h in sizes:
                body = {"images": [_b64(w, h)]}
                httpx.post(base + "/v1/embed", json=body, timeout=300).raise_for_status()
                got = drive_procs(base, [body], ctx.clients, ctx.phase(4), ctx.client_procs,
                                  path="/v1/embed")  # fmt: skip
                rows.append({"decode": decode, "reason": reason, "image": f"{w}x{h}",
                             "clients": ctx.clients, **_cell(got)})  # fmt: skip
        finally:
            peers_mod.stop(proc)
    return rows


def served_table(rows: list[dict]) -> str:
    from bench.gpu import md

    cpu = {r["image"]: r["img_s"] for r in rows if r["decode"] == "cpu"}
    return md(
        ["decode", "image", "clients", "img/s", "× cpu decode", "p50 ms", "p99 ms", "statuses"],
        [[r["decode"], r["image"], r["clients"], r["img_s"],
          f"{r['img_s'] / cpu[r['image']]:.2f}" if r["img_s"] and cpu.get(r["image"]) else "n/a",
          r["p50_ms"], r["p99_ms"], r["statuses"]] for r in rows],
    )  # fmt: skip


# --- issue 19: the peers table on this device ------------------------------------------------
def peers(ctx: Any) -> str:
    args = peer_args(ctx, model=ctx.model("ViT-B-32"), clients=f"32,{ctx.clients}")
    if ctx.dry:  # the code paths, not the figures: one cell, one round
        args.clients, args.images, args.rounds = str(ctx.clients), "224x224", 1
    n = len(peers_mod.variants(args.device))
    args.seconds = ctx.phase(4 * n)
    args.warmup = min(2.0, args.seconds / 2)
    rows = peers_mod.run(args)
    ctx.results["peers"] = rows
    return peers_mod.table(rows, f"device {ctx.device}, {args.seconds:.1f} s per cell")


# --- issue 16: served img/s vs the raw CUDA-graph bf16 encoder --------------------------------
def py_spy() -> str | None:
    """py-spy's binary: on PATH, beside this interpreter, or in a carried --target dir."""
    import shutil
    import sys
    from pathlib import Path

    found = shutil.which("py-spy")
    candidates = [Path(sys.executable).parent, *(Path(p) / "bin" for p in sys.path if p)]
    for folder in candidates:
        if not found and (folder / "py-spy").is_file():
            found = str(folder / "py-spy")
    return found


def engine_pid(server_pid: int) -> int:
    """The process that runs the model: the split's engine, or the server itself."""
    from service.engine.control import ControlBlock
    from service.engine.shm import segment_name

    try:
        control = ControlBlock.attach(segment_name(server_pid, "control"))
    except FileNotFoundError:
        return server_pid  # one process
    try:
        return control.engine()[0]
    finally:
        control.close()


class EngineProfile:
    """py-spy sampling the engine process for `seconds` (where py-spy exists): where its CPU
    goes, per thread, while a served phase runs (the GPU run's question: what in the engine
    keeps the device waiting)."""

    def __init__(self, server_pid: int, seconds: float, path: Any) -> None:
        import subprocess

        self.path, self.proc = path, None
        exe = py_spy()
        if exe is not None:
            pid, duration = engine_pid(server_pid), max(1, int(seconds))
            cmd = [exe, "record", "-p", str(pid), "-d", str(duration), "-r", "200", "-f", "raw",
                   "--threads", "--nonblocking", "-o", str(path)]  # fmt: skip
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def summary(self, top: int = 10) -> dict[str, Any]:
        """Samples per thread and the top leaf functions (self time) and service/ frames
        (inclusive), as shares of all samples."""
        if self.proc is None:
            return {"py-spy": "not installed"}
        self.proc.wait(timeout=60)
        leaf: dict[str, int] = {}
        ours: dict[str, int] = {}
        threads: dict[str, int] = {}
        total = 0
        for line in self.path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n, frames = int(count), stack.split(";")
            total += n
            threads[frames[0]] = threads.get(frames[0], 0) + n
            name = frames[-1].rsplit(":", 1)[0]  # without the line number
            leaf[name] = leaf.get(name, 0) + n
            for f in {f.rsplit(":", 1)[0] for f in frames if "service/" in f}:
                ours[f] = ours.get(f, 0) + n

        def share(d: dict[str, int]) -> list[tuple[str, float]]:
            ranked = sorted(d.items(), key=lambda kv: -kv[1])[:top]
            return [(k[-120:], round(v / max(1, total), 3)) for k, v in ranked]

        return {"samples": total, "threads": share(threads), "self": share(leaf),
                "service_inclusive": share(ours)}  # fmt: skip


def split_frontends(ctx: Any) -> int:
    """The front ends of the split run: the cores left beside the engine and the clients."""
    if ctx.dry:
        return 2
    cores = len(peers_mod._cpus(ctx.server_cpus))  # the servers' taskset
    return max(2, min(12, cores - 2))


def issue16_configs(ctx: Any) -> list[tuple[int, str, int]]:
    """(front ends, image decode, images per request) of each served row: one process (today's
    baseline), N front ends decoding on the CPU (the split's point), N front ends passing the
    JPEG bytes to the engine's device decoder; 8-image requests (the per-request HTTP costs
    amortized, as a batch client sends) and the strictest 1-image case."""
    n = split_frontends(ctx)
    # first what the targets are judged on, so that a short budget skips the others
    # (on the CPU, "gpu" is the device path's code with torchvision's CPU JPEG decoder)
    return [(n, "gpu", 8), (1, "cpu", 8), (n, "cpu", 8), (n, "gpu", 1)]


def issue16(ctx: Any) -> str:
    """The served rate against the encoder's own ceiling, in one process and with N front ends
    (the issue's targets: served >= 0.7x raw for ViT-B/16, >= 0.5x for ViT-B/32, 224x224 JPEG,
    >= 128 clients)."""
    from bench.gpu import md
    from bench.runtimes import interleaved
    from service.engine.runtimes.base import TorchRuntime

    rows: list[dict] = []
    models = ["tiny"] if ctx.dry else ["ViT-B-16", "ViT-B-32"]
    for model in models:
        if ctx.left() < 40:
            rows.append({"model": model, "skipped": f"{ctx.left():.0f} s left"})
            continue
        cpu = model_backbone(model)
        if ctx.cuda:
            from service.engine.runtimes.cudagraph import CudaGraphRuntime

            rt: Any = CudaGraphRuntime(ctx.on_device(cpu, torch.bfloat16), 32)
            rt.warm_up()
        else:
            rt = TorchRuntime(cpu)
        size = cpu.visual.image_size
        hw = size if isinstance(size, tuple) else (size, size)
        x = torch.randn(32, 3, *hw).to(ctx.device)
        with torch.no_grad():
            run = {"raw": lambda rt=rt, x=x: rt.encode(x, None, None, "append")}
            raw = interleaved(run, 32, ctx.phase(8), rounds=2)["raw"]
        del rt, x
        if ctx.cuda:
            torch.cuda.empty_cache()  # the server below needs the GPU to itself
        args = peer_args(ctx, model=model)
        weights, _ = peers_mod.save_weights(cpu, args.var, None)
        blob = checkpoint_bytes(cpu, "coop", "coop", 10, seed=0)
        configs = issue16_configs(ctx)
        for frontends, decode, per in configs:
            if ctx.left() < 25:
                rows.append({"model": f"{model}, {frontends} fe, {decode} decode",
                             "skipped": f"{ctx.left():.0f} s left"})  # fmt: skip
                continue
            env = {**serving_env(ctx), "PROMPTSERVE_FRONTENDS": str(frontends),
                   "PROMPTSERVE_IMAGE_DECODE": decode,
                   "PROMPTSERVE_LOCAL_JOBS": "false"}  # fmt: skip
            proc, base, _ = peers_mod.start(Variant(model, "promptserve", env), args, weights,
                                            None, None)  # fmt: skip
            try:
                httpx.post(f"{base}/v1/checkpoints", files={"file": ("c", blob)}, timeout=300)
                body = {"checkpoint": "coop", "images": [_b64(224, 224)] * per}
                httpx.post(base + "/v1/classify", json=body, timeout=300).raise_for_status()
                drive_procs(base, [body], ctx.clients, 2, ctx.client_procs)  # warm
                seconds = ctx.phase(len(configs) + 1)
                name = f"engine-{model}-{frontends}fe-{decode}-{per}.txt"
                profile = EngineProfile(proc.pid, seconds, ctx.var / name)
                got = drive_procs(base, [body], ctx.clients, seconds, ctx.client_procs)
                spy = profile.summary()
            finally:
                peers_mod.stop(proc)
            served = (got["steady_ok_per_s"] or 0.0) * per
            rows.append({"model": model, "frontends": frontends, "decode": decode,
                         "per_request": per, "raw_img_s": round(raw, 1), "clients": ctx.clients,
                         "served": {**_cell(got), "img_s": round(served, 1)},
                         "ratio": round(served / raw, 3), "engine_profile": spy})  # fmt: skip
            ctx.save()
    ctx.results["issue16"] = rows
    profiles = "".join(
        f"\n\nengine profile, {r['model']}, {r['frontends']} fe, {r['decode']}, "
        f"{r['per_request']}/request: {json.dumps(r['engine_profile'])}"
        for r in rows if "engine_profile" in r
    )  # fmt: skip
    return profiles.lstrip() + "\n\n" + md(
        ["model", "front ends", "decode", "img/request", "raw CUDA-graph bf16 b32 img/s"
         if ctx.cuda else "raw eager img/s", "clients", "served img/s (classify, 224 JPEG)",
         "served / raw", "p50 ms", "p99 ms", "statuses"],
        [[r["model"], "skipped: " + r["skipped"]] if "skipped" in r else
         [r["model"], r["frontends"], r["decode"], r["per_request"], r["raw_img_s"],
          r["clients"], r["served"]["img_s"], r["ratio"], r["served"]["p50_ms"],
          r["served"]["p99_ms"], r["served"]["statuses"]] for r in rows],
    )  # fmt: skip


def frontends(ctx: Any) -> str:
    """bench/frontend.py on the GPU host's cores: img/s and CPU ms per image for 1..12 front
    ends on the null engine (the target: N front ends >= 0.8 N x one, up to 12)."""
    import subprocess
    import sys

    counts = "1,2" if ctx.dry else "1,2,4,8,12"
    seconds = "1" if ctx.dry else str(max(2, min(4, int(ctx.left() / 40))))
    cmd = [sys.executable, "bench/frontend.py", "--frontends", counts, "--seconds", seconds,
           "--sizes", "224", "--formats", "json",
           "--gen-procs", "1" if ctx.dry else "4"]  # fmt: skip
    # to a file, not a pipe: what a run cut short by its timeout printed is kept and shown
    log = ctx.var / "frontend.log"
    with log.open("w") as out:
        try:
            rc: Any = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                                     timeout=max(60, ctx.left() - 5)).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = "timeout"
    printed = log.read_text(errors="replace").splitlines()
    table = "\n".join(line for line in printed if line.startswith(("|", "load")))
    ctx.results["frontends"] = {"returncode": rc, "table": table}
    if rc != 0:
        raise RuntimeError(f"bench/frontend.py: {rc}; its last lines:\n" + "\n".join(printed[-30:]))
    return table
