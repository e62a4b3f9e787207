"""Side by side with a CLIP server users already run: Infinity (infinity-emb), same weights,
same cores, same clients, same images.

    .venv/bin/python -m bench.peers                          # CPU: servers on core 0, clients on 1
    .venv/bin/python -m bench.peers --seconds 3 --clients 32 --images 640x480     # a quick check
    .venv/bin/python -m bench.peers --device cuda --server-cpus 0-7 --client-procs 4   # a GPU

One random CLIP ViT-B/32 (seeded) is saved once in both formats: open_clip safetensors for
promptserve, a Hugging Face CLIPModel directory (tokenizer and image processor built from
open_clip's own vocabulary, nothing from the hub, HF_HUB_OFFLINE=1) for Infinity; the conversion
is checked (image features equal to 1e-3). Infinity is installed by this script into its own venv
(var/peers/infinity, pinned, never a project dependency). Every server runs on --server-cpus
(taskset, OMP_NUM_THREADS = that many cores), the client processes on the other cores. All are
started first and then measured in turn, in interleaved rounds, keeping each one's best round:
background load that drifts during the run then falls on every server alike (an idle server's
own CPU use is measured and shown). Each request carries one JPEG (photo-like: smooth content and
mild noise, not pure noise), as base64 JSON: Infinity's OpenAI-style /embeddings with modality
image, promptserve's /v1/embed, and /v1/classify under a MaPLe checkpoint. promptserve's
admission limits are off here (Infinity has none) so that neither refuses work: every row is 200s
only, or its statuses say otherwise. img/s is the closed-loop steady rate (bench/load.py: each
client's answers over its own busy span, summed), so the drain after a phase does not dilute it;
p50/p99 are client latencies. Ratios are to Infinity in the same cell of the same run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import backbone, checkpoint_bytes, free_port
from bench.load import drive_procs
from service.backbones.clip import ClipBackbone

REPO = Path(__file__).resolve().parents[1]
# aiohttp: infinity-emb imports it for every image request (data URIs too) but lists it in no
# extra but "all", which would also pull CTranslate2, optimum, etc.
INFINITY = ("infinity-emb[server,torch,vision]==0.0.78", "aiohttp")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
           "INFINITY_ANONYMOUS_USAGE_STATS": "0"}  # fmt: skip


class Unavailable(Exception):
    """A server of the table cannot run here; the message says exactly why."""


@dataclass(frozen=True)
class Variant:
    """One row group of the table: a server and its settings."""

    label: str
    server: str  # "infinity" or "promptserve"
    env: dict[str, str] = field(default_factory=dict)
    route: str = "embed"  # "embed" or "classify" (MaPLe)


def variants(device: str) -> list[Variant]:
    """What the issue asks for on this device."""
    if device == "cpu":
        return [
            Variant("Infinity (torch fp32)", "infinity"),
            Variant("promptserve eager fp32", "promptserve", {"PROMPTSERVE_RUNTIME": "torch"}),
            Variant(
                "promptserve ONNX int8",
                "promptserve",
                {"PROMPTSERVE_RUNTIME": "onnx", "PROMPTSERVE_ONNX_INT8": "true"},
            ),
            Variant(
                "promptserve classify, MaPLe (eager)",
                "promptserve",
                {"PROMPTSERVE_RUNTIME": "torch"},
                "classify",
            ),
        ]
    gpu = {"PROMPTSERVE_DEVICE": device, "PROMPTSERVE_PRECISION": "bf16"}
    return [
        Variant("Infinity (torch bf16)", "infinity"),
        Variant("promptserve eager bf16", "promptserve", {**gpu, "PROMPTSERVE_RUNTIME": "torch"}),
        Variant(
            "promptserve CUDA graphs bf16",
            "promptserve",
            {**gpu, "PROMPTSERVE_RUNTIME": "cudagraph"},
        ),
        Variant(
            "promptserve ONNX CUDA EP (fp32 graph)",
            "promptserve",
            {**gpu, "PROMPTSERVE_RUNTIME": "onnx"},
        ),
        Variant(
            "promptserve classify, MaPLe (CUDA graphs)",
            "promptserve",
            {**gpu, "PROMPTSERVE_RUNTIME": "cudagraph"},
            "classify",
        ),
    ]


def photo_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A seeded photo-like JPEG (quality 90): coarse random structure upscaled, plus mild noise.
    Pure noise would be 3-5x the bytes of a photo and slow every decoder unrealistically."""
    gen = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(12, 16, 3, generator=gen) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    noise = torch.randn(height, width, 3, generator=gen) * 6
    pixels = (torch.from_numpy(np.array(img)).float() + noise).clamp(0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# --- the peer --------------------------------------------------------------------------------
def ensure_infinity(root: Path) -> Path:
    """The peer's interpreter, installing it once into its own venv (PyPI reachable needed)."""
    venv = root / "infinity"
    python, stamp = venv / "bin" / "python", venv / ".installed"
    if stamp.exists():
        return python
    log = root / "infinity-install.log"
    print(f"installing {' '.join(INFINITY)} into {venv} (once; log {log})", flush=True)
    with log.open("w") as out:
        made = subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], stdout=out,
                              stderr=subprocess.STDOUT).returncode == 0  # fmt: skip
        pip = [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--retries",
            "1",
            "--timeout",
            "15",
            *INFINITY,
        ]
        if not made or subprocess.run(pip, stdout=out, stderr=subprocess.STDOUT).returncode:
            tail = log.read_text().strip().splitlines()[-3:]
            raise Unavailable(f"cannot install {INFINITY[0]}: {' | '.join(tail)}")
    stamp.touch()
    return python


def save_weights(
    bb: ClipBackbone, root: Path, peer_python: Path | None
) -> tuple[Path, Path | None]:
    """The random backbone as open_clip safetensors and (if the peer runs) as a HF directory."""
    weights = root / f"{bb.model_name}-random.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(weights))
    if peer_python is None:
        return weights, None
    hf = root / "vit-b-32-random-hf"
    vocab = root / "clip-vocab"
    vocab.mkdir(parents=True, exist_ok=True)
    tok = bb.tokenizer  # open_clip's SimpleTokenizer: OpenAI CLIP's byte-level BPE
    # Same ids; the two special tokens under the names Hugging Face's CLIP tokenizer uses.
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    encoder = {names.get(k, k): i for k, i in tok.encoder.items()}
    (vocab / "vocab.json").write_text(json.dumps(encoder))
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    (vocab / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = bb.model.encode_image(images)
    check = root / "conversion-check.safetensors"
    ids = bb.tokenizer(["a photo of a cat."])[0]
    ids = ids[: int((ids == 49407).nonzero()[0]) + 1]  # up to end-of-text, no padding
    save_file({"images": images, "features": feats.contiguous(), "ids": ids}, str(check))
    convert = [str(peer_python), str(REPO / "bench" / "peers_hf.py"), str(weights), str(vocab),
               str(check), str(hf)]  # fmt: skip
    done = subprocess.run(convert, capture_output=True, text=True, env={**os.environ, **OFFLINE})
    if done.returncode:
        raise Unavailable(f"weight conversion for the peer failed: {done.stderr[-500:]}")
    print(done.stdout.strip(), flush=True)
    return weights, hf


# --- servers ---------------------------------------------------------------------------------
TINY = REPO / "tests" / "tiny_clip.json"


def model_args(model: str) -> list[str]:
    """`serve` flags for an open_clip name, or "tiny" (the tests' 3-layer CLIP: dry runs)."""
    return ["--model-config", str(TINY)] if model == "tiny" else ["--model", model]


def model_backbone(model: str) -> ClipBackbone:
    """The same random weights every run (seeded), as `serve` will load them from the file."""
    return backbone("", str(TINY)) if model == "tiny" else backbone(model)


def _cpus(spec: str) -> set[int]:
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out |= set(range(int(lo), int(hi or lo) + 1))
    return out


def start(
    v: Variant, args: argparse.Namespace, weights: Path, hf: Path | None, peer: Path | None
) -> tuple[subprocess.Popen, str, str]:
    """Start one server on the server cores; returns (process, base URL, health path)."""
    port = free_port()
    threads = str(len(_cpus(args.server_cpus)))
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if v.server == "infinity":
        assert peer is not None and hf is not None
        dtype = "float32" if args.device == "cpu" else "bfloat16"
        cmd = [str(peer.parent / "infinity_emb"), "v2", "--model-id", str(hf),
               "--served-model-name", "clip", "--host", "127.0.0.1", "--port", str(port),
               "--engine", "torch", "--device", "cpu" if args.device == "cpu" else "cuda",
               "--dtype", dtype, "--batch-size", str(args.max_batch_size),
               "--log-level", "warning"]  # fmt: skip
        health = "/health"
    else:
        env |= {
            "PROMPTSERVE_MAX_QUEUE": "100000", "PROMPTSERVE_MAX_QUEUE_WAIT_S": "0",
            "PROMPTSERVE_REQUEST_TIMEOUT_S": "600", "PROMPTSERVE_LOG_LEVEL": "WARNING",
            "PROMPTSERVE_ONNX_CACHE_DIR": str(args.var / "onnx"),
            "PROMPTSERVE_MAX_IMAGES": "64", **v.env,
        }  # fmt: skip
        store = args.var / f"store-{args.model}"  # one per backbone: checkpoints carry its hash
        cmd = [sys.executable, "-m", "service.cli", "serve", *model_args(args.model),
               "--pretrained", str(weights), "--store", f"file://{store}",
               "--port", str(port), "--max-batch-size", str(args.max_batch_size)]  # fmt: skip
        health = "/readyz"
    cmd = ["taskset", "-c", args.server_cpus, *cmd]
    log = (args.var / f"server-{port}.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while True:
        try:
            if httpx.get(base + health, timeout=2).status_code == 200:
                return proc, base, health
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            tail = Path(log.name).read_text()[-1500:]
            raise Unavailable(f"{v.label} did not become ready: {tail}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def request(v: Variant, image_b64: str) -> tuple[str, dict]:
    if v.server == "infinity":
        uri = "data:image/jpeg;base64," + image_b64
        return "/embeddings", {"model": "clip", "input": [uri], "modality": "image"}
    if v.route == "classify":
        return "/v1/classify", {"checkpoint": "maple", "images": [image_b64]}
    return "/v1/embed", {"images": [image_b64]}


# --- the table -------------------------------------------------------------------------------
def run(args: argparse.Namespace, chosen: list[Variant] | None = None) -> list[dict]:
    """Every variant x image x client count; rows as dicts (also printed as they come)."""
    import base64

    args.var.mkdir(parents=True, exist_ok=True)
    chosen = chosen if chosen is not None else variants(args.device)
    peer, why_not = None, "the peer's weight conversion is written for ViT-B/32 only"
    if args.model == "ViT-B-32" and any(v.server == "infinity" for v in chosen):
        try:
            peer = ensure_infinity(args.var)
        except Unavailable as err:
            why_not = str(err)
    bb = model_backbone(args.model)
    weights, hf = save_weights(bb, args.var, peer)
    images = {}
    for spec in args.images.split(","):
        w, h = (int(x) for x in spec.split("x"))
        images[spec] = base64.b64encode(photo_jpeg(w, h)).decode()
    clients = [int(c) for c in args.clients.split(",")]
    server_cpus = _cpus(args.server_cpus)
    others = (os.sched_getaffinity(0) - server_cpus) or server_cpus
    os.sched_setaffinity(0, others)  # the clients (this process and its pool) off the servers
    rows: list[dict] = []
    running: list[tuple[Variant, subprocess.Popen, str, dict]] = []
    try:
        for v in chosen:  # all up at once (idle ones cost ~nothing), measured in turn below
            try:
                if v.server == "infinity" and peer is None:
                    raise Unavailable(why_not)
                proc, base, health = start(v, args, weights, hf, peer)
            except Unavailable as err:
                rows.append({"label": v.label, "skipped": str(err)[:300]})
                print(f"{v.label}: skipped: {err}", flush=True)
                continue
            info = httpx.get(base + health, timeout=10).json() if v.server != "infinity" else {}
            running.append((v, proc, base, info))
            if v.route == "classify":
                blob = checkpoint_bytes(bb, "maple", "maple", 10, seed=0)
                r = httpx.post(f"{base}/v1/checkpoints", files={"file": ("c", blob)}, timeout=300)
                r.raise_for_status()
        for _, proc, _, info in running:
            info["idle_cpu"] = idle_cpu(proc.pid)
        for spec, image in images.items():
            for v, _, base, _ in running:  # first request of this size: allocations, caches
                path, body = request(v, image)
                httpx.post(base + path, json=body, timeout=300).raise_for_status()
            for n in clients:
                best: dict[str, dict] = {}
                for _ in range(args.rounds):  # interleaved: drifting background load is shared
                    for v, _, base, _ in running:
                        path, body = request(v, image)
                        if args.warmup:
                            drive_procs(base, [body], n, args.warmup, args.client_procs, path=path)
                        got = drive_procs(
                            base, [body], n, args.seconds, args.client_procs, path=path
                        )
                        old = best.get(v.label)
                        if old is None or (got["steady_ok_per_s"] or 0) > (
                            old["steady_ok_per_s"] or 0
                        ):
                            best[v.label] = got
                for v, _, _, info in running:
                    got = best[v.label]
                    row = {"label": v.label, "image": spec, "clients": n,
                           "img_s": got["steady_ok_per_s"], "p50_ms": got.get("p50_ms"),
                           "p99_ms": got.get("p99_ms"), "statuses": got["statuses"],
                           "errors": got["transport_errors"], "idle_cpu": info["idle_cpu"],
                           "runtime": info.get("runtime"), "providers": info.get("providers"),
                           "image_decode": info.get("image_decode")}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        for _, proc, _, _ in running:
            stop(proc)
    return rows


def idle_cpu(pid: int, seconds: float = 2.0) -> float:
    """Share of one core a server uses while nobody calls it (from /proc): the cost an idle
    server puts on the others that share its cores while they are measured."""

    def ticks() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    before = ticks()
    time.sleep(seconds)
    return round((ticks() - before) / os.sysconf("SC_CLK_TCK") / seconds, 3)


def table(rows: list[dict], header: str) -> str:
    """The markdown table, each row's img/s also as a ratio to Infinity's in the same cell."""
    ref = {(r["image"], r["clients"]): r["img_s"] for r in rows if r["label"].startswith("Inf")
           and "img_s" in r}  # fmt: skip
    out = [header, "", "| server | image | clients | img/s | × Infinity | p50 ms | p99 ms | "
           "non-200 | idle CPU |", "|---|---|---:|---:|---:|---:|---:|---|---:|"]  # fmt: skip
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['label']} | | | skipped: {r['skipped'][:200]} | | | | | |")
            continue
        base, rate = ref.get((r["image"], r["clients"])), r["img_s"]
        ratio = f"{rate / base:.2f}×" if base and rate is not None else "n/a"
        shown = "n/a (too few answers: lengthen --seconds)" if rate is None else f"{rate:.1f}"
        bad = {k: n for k, n in r["statuses"].items() if int(k) != 200} | r["errors"]
        out.append(
            f"| {r['label']} | {r['image']} | {r['clients']} | {shown} | {ratio} | "
            f"{r['p50_ms'] or 0:.0f} | {r['p99_ms'] or 0:.0f} | {bad or ''} | {r['idle_cpu']:.0%} |"
        )
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N")
    p.add_argument("--model", default="ViT-B-32", help="open_clip name, or tiny (dry runs)")
    p.add_argument("--seconds", type=float, default=10, help="measured s per cell and round")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best is kept")
    p.add_argument("--warmup", type=float, default=0, help="unmeasured s before each phase")
    p.add_argument("--clients", default="32,128")
    p.add_argument("--images", default="224x224,640x480", help="WxH JPEG sizes")
    p.add_argument("--server-cpus", default="0", help="taskset list for every server")
    p.add_argument("--client-procs", type=int, default=1, help="load generator processes")
    p.add_argument("--max-batch-size", type=int, default=32, help="both servers' batch cap")
    p.add_argument("--start-timeout", type=float, default=900, help="s (ONNX int8 export)")
    p.add_argument("--var", type=Path, default=REPO / "var" / "peers", help="venv, weights")
    p.add_argument("--only", default="", help="comma-separated label prefixes to run")
    return p


def main() -> None:
    args = parser().parse_args()
    only = [o for o in args.only.split(",") if o]
    chosen = [v for v in variants(args.device) if not only or v.label.startswith(tuple(only))]
    rows = run(args, chosen)
    header = (
        f"device {args.device}, servers on cores {args.server_cpus} ({os.cpu_count()} in all), "
        f"{args.client_procs} client process(es); ViT-B/32 random weights; torch "
        f"{torch.__version__}; best of {args.rounds} interleaved rounds of {args.seconds:.0f} s"
    )
    print(table(rows, header))


if __name__ == "__main__":
    main()
