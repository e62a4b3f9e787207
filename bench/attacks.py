"""An ordinary client's latency while hostile clients attack, and the memory of a worst request.

    .venv/bin/python bench/attacks.py                          # ViT-B-32, random weights
    .venv/bin/python bench/attacks.py --model tiny --seconds 5 # the test CLIP: quick

One real `promptserve serve` (pinned to --server-cpus, the clients on the other cores). The
ordinary request: one 224x224 JPEG classified by a checkpoint. Phases, each printing the
ordinary request's latency (p50 / p90 of sequential requests) and its ratio to phase 0:
  0. unloaded;
  1. slow bodies: --slow-clients connections that send their headers and a few body bytes, then
     stall (each reopened when the server answers its 408);
  2. heavy ad-hoc: --heavy-clients clients each sending, one after another, zero-shot requests of
     1,000 new class names x 20 templates (never cached);
  3. the worst request: the largest images the limits admit (PNGs of 6000x6000 = 36 MP, as many
     as the per-request pixel budget takes), the server's RSS sampled every 5 ms during it
     against its RSS before; measured first, before the attacks grow the process's heaps.
The target (issue 14): ordinary latency under attack <= 2x unloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import backbone, checkpoint_bytes, free_port, jpeg_b64, percentile

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "tiny_clip.json"


def kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def start(args: argparse.Namespace, tmp: Path, weights: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PROMPTSERVE_RUNTIME": "torch", "PROMPTSERVE_LOG_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "service.cli", "serve", "--pretrained", str(weights),
           "--store", f"file://{tmp / 'store'}", "--port", str(port)]  # fmt: skip
    cmd += ["--model-config", str(TINY)] if args.model == "tiny" else ["--model", args.model]
    cpus = {int(c) for c in args.server_cpus.split(",")}
    cmd = ["taskset", "-c", args.server_cpus, *cmd]
    os.sched_setaffinity(0, (os.sched_getaffinity(0) - cpus) or cpus)
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 300
    while time.monotonic() < end:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return server, base
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            break
        time.sleep(0.3)
    raise SystemExit((tmp / "server.log").read_text())


def ordinary(base: str, body: dict, seconds: float) -> dict:
    """Sequential ordinary requests for `seconds`: latency percentiles (ms) and statuses."""
    lat, statuses = [], {}
    end = time.perf_counter() + seconds
    with httpx.Client(base_url=base, timeout=60) as client:
        while time.perf_counter() < end or not lat:
            t = time.perf_counter()
            r = client.post("/v1/classify", json=body)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                lat.append((time.perf_counter() - t) * 1e3)
    return {
        "n": len(lat),
        "p50_ms": round(percentile(lat, 50), 1),
        "p90_ms": round(percentile(lat, 90), 1),
        "statuses": statuses,
    }


class SlowBodies:
    """`n` connections that send headers and a few body bytes, then stall; reopened on 408."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self.stop = threading.Event()
        self.answers: dict[str, int] = {}
        self.threads = [threading.Thread(target=self._one, daemon=True) for _ in range(n)]

    def _one(self) -> None:
        head = (
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n"
        )
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                    s.sendall(head + b'{"images": ["')
                    first = s.recv(64)  # blocks until the server gives up on us
                    key = first.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"
            except OSError as exc:
                key = type(exc).__name__
            self.answers[key] = self.answers.get(key, 0) + 1

    def __enter__(self) -> SlowBodies:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()


class HeavyAdHoc:
    """Clients sending 1,000 fresh class names x 20 templates, one request after another."""

    def __init__(self, base: str, clients: int) -> None:
        self.base, self.clients = base, clients
        self.stop = threading.Event()
        self.statuses: dict[int, int] = {}
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        image = jpeg_b64(64)
        templates = [f"a photo number {i} of a {{}}." for i in range(20)]
        async with httpx.AsyncClient(base_url=self.base, timeout=300) as client:

            async def one(i: int) -> None:
                k = 0
                while not self.stop.is_set():
                    k += 1
                    names = [f"thing {i} {k} {j}" for j in range(1000)]
                    body = {"classnames": names, "templates": templates, "images": [image]}
                    try:
                        r = await client.post("/v1/classify", json=body)
                        code = r.status_code
                    except httpx.HTTPError:
                        code = -1
                    self.statuses[code] = self.statuses.get(code, 0) + 1
                    if code == 429:
                        await asyncio.sleep(0.2)

            await asyncio.gather(*(one(i) for i in range(self.clients)))

    def __enter__(self) -> HeavyAdHoc:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()


def big_png(side: int) -> str:
    """A side x side PNG of smooth noise: compresses well, decodes to side^2 pixels."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (side // 200, side // 200, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((side, side), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-B-32", help="'tiny' or an open_clip architecture")
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--slow-clients", type=int, default=300)
    p.add_argument("--heavy-clients", type=int, default=6)
    p.add_argument("--server-cpus", default="0")
    args = p.parse_args()
    bb = backbone("", str(TINY)) if args.model == "tiny" else backbone(args.model)
    tmp = Path(tempfile.mkdtemp())
    weights = tmp / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(weights))
    server, base = start(args, tmp, weights)
    port = int(base.rsplit(":", 1)[1])
    try:
        blob = checkpoint_bytes(bb, "ordinary", "coop", 10, seed=0)
        httpx.post(f"{base}/v1/checkpoints", files={"file": ("c", blob)}, timeout=120)
        body = {"checkpoint": "ordinary", "images": [jpeg_b64(224)]}
        ordinary(base, body, 2)  # warm
        print(f"server: {args.model} (random weights), on cpus {args.server_cpus}")
        # 3. (measured first, on a fresh process) the worst request the limits admit
        before = kib(server.pid, "VmRSS")
        peak = [before]
        sampling = threading.Event()

        def sample() -> None:  # RSS every 5 ms: the process's own peak was set at start-up
            while not sampling.is_set():
                peak.append(kib(server.pid, "VmRSS"))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        side = 6000
        n = max(1, 100_000_000 // (side * side))  # PROMPTSERVE_MAX_REQUEST_PIXELS default
        worst = {"checkpoint": "ordinary", "images": [big_png(side)] * n}
        t = time.perf_counter()
        r = httpx.post(f"{base}/v1/classify", json=worst, timeout=300)
        dt = time.perf_counter() - t
        sampling.set()
        sampler.join()
        after = max(peak)
        print(
            f"3. worst request: {n} x {side}x{side} PNG ({n * side * side / 1e6:.0f} MP): "
            f"{r.status_code} in {dt:.1f} s; server RSS {before / 1024:.0f} MiB before, "
            f"{after / 1024:.0f} MiB at its peak during it (+{(after - before) / 1024:.0f} MiB)"
        )
        over = {"checkpoint": "ordinary", "images": [big_png(side)] * (n + 1)}
        r = httpx.post(f"{base}/v1/classify", json=over, timeout=300)
        print(f"   one image more: {r.status_code} {r.json()['error']['code']}")
        rows = []
        base_row = ordinary(base, body, args.seconds)
        rows.append(("0. unloaded", base_row, {}))
        with SlowBodies(port, args.slow_clients) as slow:
            time.sleep(2)  # let the crowd connect
            rows.append(("1. slow bodies", ordinary(base, body, args.seconds), slow.answers))
        with HeavyAdHoc(base, args.heavy_clients) as heavy:
            time.sleep(2)
            rows.append(("2. heavy ad-hoc", ordinary(base, body, args.seconds), heavy.statuses))
        print("| phase | ordinary p50 ms | p90 ms | p50 x unloaded | requests | attackers saw |")
        print("|---|---:|---:|---:|---:|---|")
        for name, row, seen in rows:
            ratio = row["p50_ms"] / base_row["p50_ms"]
            print(
                f"| {name} | {row['p50_ms']} | {row['p90_ms']} | {ratio:.2f} | "
                f"{row['statuses']} | {json.dumps(seen)} |"
            )
        return 0
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    raise SystemExit(main())
