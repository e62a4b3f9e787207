"""Load and overload against a real `promptserve serve` (uvicorn) on loopback, mixed checkpoints.

    .venv/bin/python bench/load.py                       # tiny test CLIP: seconds, any machine
    .venv/bin/python bench/load.py --model ViT-B-32 --seconds 30 --clients 32

Two phases against one server process:
  1. load: N clients, each sending one request after another for a fixed time, round-robin over
     checkpoints of several methods (CoOp, CoCoOp, VPT, MaPLe, bias; different signatures);
     prints throughput, latency p50/p95/p99, responses by status, the server's peak RSS.
  2. overload: far more clients than the queue admits (--overload-clients, the server's
     max_queue set to --max-queue): prints the share refused with 429, how fast a 429 comes,
     latency of the accepted requests (bounded by the queue, not by the crowd), and the
     server's RSS over the run (first third vs last third: no growth).
Exits 1 if any response was a 5xx or an error other than 429.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import backbone, checkpoint_bytes, free_port, jpeg_b64, percentile

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "tiny_clip.json"
METHODS = ("coop", "cocoop", "vpt", "maple", "bias")


def _proc_kib(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of a process, in KiB, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class RssSampler:
    """Samples the server's RSS every `interval` seconds while running."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(_proc_kib(self.pid, "VmRSS"))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def served_seconds(base: str) -> tuple[float, float]:
    """(count, sum) of the server's own classify latency histogram: time inside the service,
    without the client's queueing, to tell a slow server from a saturated load generator."""
    count = total = 0.0
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith("promptserve_request_seconds_count{") and 'route="classify"' in line:
            count += float(line.rsplit(" ", 1)[1])
        elif line.startswith("promptserve_request_seconds_sum{") and 'route="classify"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return count, total


def timed_phase(
    base: str, bodies: list[dict], clients: int, seconds: float, procs: int = 1
) -> dict:
    """One `drive`, plus the mean latency the server itself measured for the accepted requests."""
    n0, s0 = served_seconds(base)
    out = drive_procs(base, bodies, clients, seconds, procs)
    n1, s1 = served_seconds(base)
    if n1 > n0:
        out["server_mean_ms"] = round((s1 - s0) / (n1 - n0) * 1e3, 1)
    return out


async def drive(
    base: str,
    bodies: list[dict],
    clients: int,
    seconds: float,
    raw: bool = False,
    path: str = "/v1/classify",
) -> dict:
    """`clients` concurrent clients, each sending one request after another for `seconds`
    (JSON bodies to `path`; bench/peers.py drives other servers' routes with it too)."""
    lat_ok: list[float] = []
    lat_429: list[float] = []
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    rates: list[float] = []  # each client's answers per second over its own busy span
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:

        async def one(i: int) -> None:
            k, ok, first, last = i, 0, time.perf_counter(), 0.0
            while time.perf_counter() < stop:
                body = bodies[k % len(bodies)]
                k += clients
                t = time.perf_counter()
                try:
                    r = await client.post(path, json=body)
                except httpx.HTTPError as exc:  # connection refused or reset: counted, not hidden
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                dt = time.perf_counter() - t
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    lat_ok.append(dt)
                    ok, last = ok + 1, time.perf_counter()
                elif r.status_code == 429:
                    lat_429.append(dt)
                    await asyncio.sleep(0.005)  # a polite client backs off a little, not long
            if ok and last > first:
                rates.append(ok / (last - first))

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    if raw:
        return {"lat_ok": lat_ok, "lat_429": lat_429, "statuses": statuses, "errors": errors,
                "elapsed": elapsed, "rates": rates}  # fmt: skip
    return summarize(
        clients, elapsed, lat_ok, lat_429, statuses, errors, sum(rates) if rates else None
    )


def _drive_in_process(args: tuple[str, list[dict], int, float, int, str]) -> dict:
    base, bodies, clients, seconds, offset, path = args
    turned = bodies[offset:] + bodies[:offset]
    return asyncio.run(drive(base, turned, clients, seconds, raw=True, path=path))


def drive_procs(
    base: str,
    bodies: list[dict],
    clients: int,
    seconds: float,
    procs: int,
    path: str = "/v1/classify",
) -> dict:
    """`drive` split over `procs` processes: one Python process cannot load a server with
    hundreds of clients (httpx costs about a millisecond of CPU per request)."""
    if procs <= 1:
        return asyncio.run(drive(base, bodies, clients, seconds, path=path))
    from concurrent.futures import ProcessPoolExecutor

    shares = [clients // procs + (i < clients % procs) for i in range(procs)]
    jobs = [(base, bodies, n, seconds, i, path) for i, n in enumerate(shares) if n]
    with ProcessPoolExecutor(len(jobs)) as pool:
        raws = list(pool.map(_drive_in_process, jobs))
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    for r in raws:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return summarize(
        clients, max(r["elapsed"] for r in raws),
        [x for r in raws for x in r["lat_ok"]], [x for r in raws for x in r["lat_429"]],
        statuses, errors, sum(x for r in raws for x in r["rates"]) or None,
    )  # fmt: skip


def summarize(
    clients: int, elapsed: float, lat_ok: list[float], lat_429: list[float],
    statuses: dict[int, int], errors: dict[str, int], steady: float | None = None,
) -> dict:  # fmt: skip
    out: dict = {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "ok_per_s": round(len(lat_ok) / elapsed, 1),
        # Closed loop: the sum over clients of each one's answers over its own span (first send
        # to last answer) is the rate the server sustained under all of them at once, without
        # ok_per_s's drain, where fewer clients are left (matters when latency ~ the phase).
        "steady_ok_per_s": None if steady is None else round(steady, 2),
        "statuses": dict(sorted(statuses.items())),
        "transport_errors": errors,
    }
    if lat_ok:
        out |= {f"p{q}_ms": round(percentile(lat_ok, q) * 1e3, 1) for q in (50, 95, 99)}
        out["client_mean_ms"] = round(sum(lat_ok) / len(lat_ok) * 1e3, 1)
        out["max_ms"] = round(max(lat_ok) * 1e3, 1)
    if lat_429:
        out["p99_429_ms"] = round(percentile(lat_429, 99) * 1e3, 1)
    return out


def start_server(
    args: argparse.Namespace, tmp: Path, weights: Path
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "PROMPTSERVE_MAX_QUEUE": str(args.max_queue),
        "PROMPTSERVE_REQUEST_TIMEOUT_S": str(args.timeout),
        "PROMPTSERVE_RUNTIME": "torch",
        "PROMPTSERVE_LOG_LEVEL": "WARNING",
    }
    cmd = [sys.executable, "-m", "service.cli", "serve", "--pretrained", str(weights),
           "--store", f"file://{tmp / 'store'}", "--port", str(port),
           "--max-batch-size", str(args.max_batch_size)]  # fmt: skip
    cmd += ["--model-config", str(TINY)] if args.model == "tiny" else ["--model", args.model]
    if args.server_cpus:  # the server on these cores, this load generator on the others
        cpus = {int(c) for c in args.server_cpus.split(",")}
        cmd = ["taskset", "-c", args.server_cpus, *cmd]
        os.sched_setaffinity(0, (os.sched_getaffinity(0) - cpus) or cpus)
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return server, base
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit((tmp / "server.log").read_text())
        time.sleep(0.3)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny", help="'tiny' (tests/tiny_clip.json) or open_clip")
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--checkpoints", type=int, default=10, help="spread over the methods")
    p.add_argument("--overload-clients", type=int, default=256)
    p.add_argument("--max-queue", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--timeout", type=float, default=10.0, help="the server's request deadline")
    p.add_argument("--client-procs", type=int, default=1, help="load generator processes")
    p.add_argument(
        "--server-cpus", default="", help="e.g. 0: pin the server there, the clients elsewhere"
    )
    args = p.parse_args()
    bb = backbone("", str(TINY)) if args.model == "tiny" else backbone(args.model)
    tmp = Path(tempfile.mkdtemp())
    weights = tmp / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(weights))
    server, base = start_server(args, tmp, weights)
    try:
        size = bb.visual.image_size
        image = jpeg_b64(size if isinstance(size, int) else size[0])
        names = []
        for i in range(args.checkpoints):
            method = METHODS[i % len(METHODS)]
            name = f"{method}-{i}"
            blob = checkpoint_bytes(bb, name, method, 10, seed=i)
            r = httpx.post(f"{base}/v1/checkpoints", files={"file": ("c", blob)}, timeout=120)
            r.raise_for_status()
            names.append(name)
        bodies = [{"checkpoint": n, "images": [image]} for n in names]
        for body in bodies:  # resident and warm before timing
            httpx.post(f"{base}/v1/classify", json=body, timeout=120).raise_for_status()
        rss_idle = _proc_kib(server.pid, "VmRSS")
        print(
            f"server: model {args.model} (random weights), {os.cpu_count()} CPU cores, "
            f"{args.checkpoints} checkpoints over {', '.join(METHODS)}; max_queue "
            f"{args.max_queue}, max_batch_size {args.max_batch_size}, deadline {args.timeout} s; "
            f"RSS when warm {rss_idle / 1024:.0f} MiB"
        )
        with RssSampler(server.pid) as load_rss:
            load = timed_phase(base, bodies, args.clients, args.seconds, args.client_procs)
        load["peak_rss_mib"] = round(_proc_kib(server.pid, "VmHWM") / 1024, 1)
        print(f"1. load: {json.dumps(load)}")

        with RssSampler(server.pid) as over_rss:
            over = timed_phase(base, bodies, args.overload_clients, args.seconds, args.client_procs)
        third = max(1, len(over_rss.samples) // 3)
        first = max(over_rss.samples[:third]) / 1024
        last = max(over_rss.samples[-third:]) / 1024
        total = sum(over["statuses"].values()) or 1
        over |= {
            "share_429": round(over["statuses"].get(429, 0) / total, 3),
            "rss_first_third_mib": round(first, 1),
            "rss_last_third_mib": round(last, 1),
            "rss_growth_mib": round(last - first, 1),
            "peak_rss_mib": round(_proc_kib(server.pid, "VmHWM") / 1024, 1),
        }
        print(f"2. overload: {json.dumps(over)}")
        after = asyncio.run(drive(base, bodies, 1, min(3.0, args.seconds)))
        print(f"3. after the overload, one client: {json.dumps(after)}")
        del load_rss
        bad = {
            s: n
            for phase in (load, over, after)
            for s, n in phase["statuses"].items()
            if s not in (200, 429)
        }
        errors = sum(sum(ph["transport_errors"].values()) for ph in (load, over, after))
        print(json.dumps({"load": load, "overload": over, "after": after, "bad": bad}))
        return 1 if bad or errors or after["statuses"].get(429) else 0
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    raise SystemExit(main())
