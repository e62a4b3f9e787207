"""Front-end capacity of `--frontends N` against a null engine (only the front ends cost).

    .venv/bin/python bench/frontend.py                      # 1 and 2 front ends, ~3 min
    .venv/bin/python bench/frontend.py --frontends 1,2,4,8,12 --seconds 20   # a GPU host

The null engine is the real engine process's wire (engine/ipc.py, the front ends' slots) with
no model: it reads each request's images from shared memory (the engine's real per-image CPU
work) and answers at once. For JSON-base64 and multipart bodies, 224x224 and 640x480 JPEGs, and
each front-end count, it prints:
- img/s served;
- CPU milliseconds per image in the front ends (summed) and in the engine, from the processes'
  own CPU times (/proc/PID/stat): these hold on any core count, so a 2-core machine measures
  them as well as a 16-core one. Throughput on a machine with fewer cores than processes does
  not scale, and says nothing about a GPU host; the per-image CPU figures project it.
The load generator runs in `--gen-procs` processes; its own capacity against a trivial server
(one fixed response, no parsing) is printed beside, so we know it is not the bottleneck.

Under HTTP load on a small machine the engine is mostly idle, so its CPU per image there is
mostly the cost of waking up for each call. What one engine core can dispatch is measured
apart (`--engine-calls`): wire clients, each with its own slots like a front end, keep
`--engine-concurrency` calls in flight against the same null engine, and the engine's CPU per
image at that saturation is printed (the issue's target: <= 0.05 ms, >= 20k img/s a core).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from PIL import Image

from bench.common import free_port

REPO = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SIZES = {"224": (224, 224), "640x480": (640, 480)}


# --- the null engine (runs in the engine process the supervisor starts) ----------------------
def null_engine(layout: Any, settings: Any, generation: int) -> None:
    """An engine process with the real wire and no model: slots read, answers at once."""
    from service.engine.control import ControlBlock

    control = ControlBlock.attach(layout.control, Path(layout.shm_dir))
    asyncio.run(_serve_null(layout, control, generation))


async def _serve_null(layout: Any, control: Any, generation: int) -> None:
    import torch

    from service.engine.ipc import EngineServer
    from service.engine.shm import SlotReader

    shape = [3, 224, 224]
    readers: dict[str, SlotReader] = {}
    config = {"size": (224, 224), "mode": "RGB", "mean": OPENAI_MEAN, "std": OPENAI_STD,
              "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}  # fmt: skip
    facts = {"backbone": "null", "kind": "clip", "pretrained": "-", "device": "cpu",
             "fingerprint": "-", "runtime": "null"}  # fmt: skip

    async def hello(body: Any, blobs: Any) -> Any:
        return {"capabilities": ["classify", "embed"], "describe": facts, "preprocess": config,
                "slot_shape": shape, "side": 224}, ()  # fmt: skip

    async def status(body: Any, blobs: Any) -> Any:
        return {"health": {"store": "ok", "resident": 0}, "stats": {}, "queue_depth": 0}, ()

    async def classify(body: Any, blobs: Any) -> Any:
        name = body["segment"]
        if name not in readers:
            readers[name] = SlotReader(
                name, body["count"], shape, Path(layout.shm_dir), dtype=torch.uint8
            )
        # the engine's CPU work on a GPU host: the slots' copy (normalizing runs on the device;
        # on a CPU device it is noise beside the encoder's tens of ms per image)
        images = readers[name].read(body["slots"])
        rows = [[["a", 1.0]]] * int(images.shape[0])
        return [
            {"checkpoint": None, "version": None, "method": "zeroshot", "predictions": rows}
        ], ()

    server = EngineServer(layout.engine_address, {"hello": hello, "status": status,
                                                  "classify": classify})  # fmt: skip
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    task = asyncio.get_running_loop().create_task(server.serve())
    control.set_engine(os.getpid(), generation, True)
    await stop.wait()
    task.cancel()
    server.close()


def serve(port: int, n: int) -> int:
    """The split service on the null engine (run as `bench/frontend.py --serve PORT N`)."""
    from service.logs import configure
    from service.settings import Settings
    from service.split import frontend_process
    from service.supervisor import Supervisor

    configure("text", "WARNING")
    store = tempfile.mkdtemp(prefix="bench-frontend-")
    settings = Settings(port=port, frontends=n, local_jobs=False, store=f"file://{store}",
                        max_queue=100_000, log_level="WARNING")  # fmt: skip
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    sock.set_inheritable(True)
    metrics = Path(tempfile.mkdtemp(prefix="bench-frontend-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
    return Supervisor(null_engine, frontend_process, settings, n, sock).run()


# --- the engine at saturation: wire clients, no HTTP -----------------------------------------
def _wire_client(address: str, per_call: int, concurrency: int, seconds: float, seed: int,
                 go: Any, out: Any) -> None:  # fmt: skip
    """A front end's engine traffic without the front end: slots written once, then calls."""
    import torch

    from service.engine.ipc import EngineConnection
    from service.engine.shm import SlotPool

    pool = SlotPool(f"ps-bench-{os.getpid()}-{seed}", concurrency * per_call, [3, 224, 224],
                    dtype=torch.uint8)  # fmt: skip
    slots = pool.put(torch.randint(0, 255, (pool.count, 3, 224, 224), dtype=torch.uint8))

    async def run() -> int:
        conn = EngineConnection(address)
        conn.start()
        done = 0
        end = time.monotonic() + seconds

        async def one(k: int) -> None:
            nonlocal done
            mine = slots[k * per_call : (k + 1) * per_call]
            body = {"request_id": f"{seed}-{k}", "refs": [], "adhoc": None, "top_k": 1,
                    "deadline": 1e12, "segment": pool.name, "count": pool.count,
                    "slots": mine}  # fmt: skip
            while time.monotonic() < end:
                await conn.call("classify", body)
                done += per_call

        await conn.call("hello", {})
        out.put("ready")
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        await asyncio.gather(*(one(k) for k in range(concurrency)))
        await conn.close()
        return done

    try:
        out.put(asyncio.run(run()))
    finally:
        pool.close()


def engine_capacity(args: argparse.Namespace) -> None:
    """The null engine's CPU per image with `--engine-concurrency` calls in flight."""
    port = free_port()
    server = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve",
                               str(port), "1"])  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}", server)
        engine, _ = processes(server.pid)
        from service.engine.shm import SHM_DIR, segment_name

        address = f"ipc://{SHM_DIR}/{segment_name(server.pid, 'engine.ipc')}"
        print("| images per call | clients x calls in flight | calls/s | img/s | "
              "engine CPU ms/img |\n|---|---|---|---|---|")  # fmt: skip
        ctx = mp.get_context("spawn")
        for per_call in [int(x) for x in args.engine_calls.split(",")]:
            q: Any = ctx.Queue()
            go = ctx.Event()
            procs = [ctx.Process(target=_wire_client, args=(
                address, per_call, args.engine_concurrency, args.seconds, i, go, q))
                for i in range(args.gen_procs)]  # fmt: skip
            for p in procs:
                p.start()
            for _ in procs:
                assert _get(q, procs) == "ready"
            before = cpu_seconds(engine)
            go.set()
            images = sum(_get(q, procs, args.seconds + 120) for _ in procs)
            used = cpu_seconds(engine) - before
            for p in procs:
                p.join()
            rate = images / args.seconds
            print(f"| {per_call} | {args.gen_procs} x {args.engine_concurrency} | "
                  f"{rate / per_call:,.0f} | {rate:,.0f} | {1000 * used / max(1, images):.4f} |",
                  flush=True)  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


# --- the trivial server: the load generator's own ceiling ------------------------------------
def trivial(port: int) -> None:
    import uvicorn

    body = b'{"results":[]}'

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --- load --------------------------------------------------------------------------------------
def jpeg(size: tuple[int, int], seed: int) -> bytes:
    import numpy as np

    rng = np.random.default_rng(seed)
    # smooth content (a photo's spectrum, not noise: noise JPEGs are unrealistically large)
    small = rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _generator(url: str, fmt: str, size: str, seconds: float, concurrency: int,
               per_request: int, go: Any, out: Any) -> None:  # fmt: skip
    blobs = [jpeg(SIZES[size], seed) for seed in range(8)]
    out.put("ready")
    go.wait()  # every generator starts at once: one window for all

    async def run() -> tuple[int, int]:
        done = errors = 0
        end = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:

            async def one(worker: int) -> None:
                nonlocal done, errors
                i = worker
                while time.monotonic() < end:
                    imgs = [blobs[(i + k) % len(blobs)] for k in range(per_request)]
                    i += 1
                    if fmt == "json":
                        body = {"images": [base64.b64encode(b).decode() for b in imgs],
                                "classnames": ["a", "b"]}  # fmt: skip
                        r = await client.post(url, json=body)
                    else:
                        files = [
                            ("images", (f"{k}.jpg", b, "image/jpeg")) for k, b in enumerate(imgs)
                        ]
                        r = await client.post(url, files=files, data={"classnames": '["a","b"]'})
                    if r.status_code == 200:
                        done += per_request
                    else:
                        errors += 1

            await asyncio.gather(*(one(w) for w in range(concurrency)))
        return done, errors

    out.put(asyncio.run(run()))


def load(
    url: str, fmt: str, size: str, args: argparse.Namespace, pids: tuple[int, ...] = ()
) -> tuple[float, int, list[float]]:
    """img/s over `args.seconds` from `args.gen_procs` generator processes, the errors, and
    the CPU seconds each of `pids` used in that window."""
    ctx = mp.get_context("spawn")
    q: Any = ctx.Queue()
    go = ctx.Event()
    procs = [
        ctx.Process(
            target=_generator,
            args=(url, fmt, size, args.seconds, args.concurrency, args.per_request, go, q),
        )
        for _ in range(args.gen_procs)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        assert _get(q, procs) == "ready"
    before = [cpu_seconds(pid) for pid in pids]
    go.set()
    results = [_get(q, procs, args.seconds + 120) for _ in procs]
    used = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
    for p in procs:
        p.join()
    return sum(r[0] for r in results) / args.seconds, sum(r[1] for r in results), used


def _get(q: Any, procs: list[Any], timeout: float = 120.0) -> Any:
    """The next thing a generator reports; fails (not hangs) when one of them died first or
    nothing comes within `timeout` s (the GPU host's first run hung on a silent child)."""
    import queue

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            return q.get(timeout=1.0)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise SystemExit(f"a load generator exited with {dead}") from None
    raise SystemExit(f"no load generator reported within {timeout:.0f} s")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def processes(supervisor: int) -> tuple[int, list[int]]:
    """(engine pid, front-end pids) of the supervisor's children."""
    from service.engine.control import ControlBlock
    from service.engine.shm import segment_name

    control = ControlBlock.attach(segment_name(supervisor, "control"))
    engine = control.engine()[0]
    control.close()
    kids = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    fronts = [int(k) for k in kids if int(k) != engine
              and b"resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes()]  # fmt: skip
    return engine, fronts


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise SystemExit("server not ready")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--frontends", default="1,2")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--gen-procs", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8, help="connections per generator")
    p.add_argument("--per-request", type=int, default=1, help="images per request")
    p.add_argument("--formats", default="json,multipart")
    p.add_argument("--sizes", default="224,640x480")
    p.add_argument(
        "--engine-calls",
        default="1,8",
        help="images per call for the engine-capacity table ('' skips it)",
    )
    p.add_argument(
        "--engine-concurrency",
        type=int,
        default=64,
        help="calls in flight per wire client in the engine-capacity table",
    )
    p.add_argument(
        "--http",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the HTTP table (--no-http: the engine-capacity table only)",
    )
    p.add_argument("--serve", nargs=2, type=int, help=argparse.SUPPRESS)
    p.add_argument("--trivial", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve(*args.serve)
    if args.trivial:
        trivial(args.trivial)
        return 0

    if args.engine_calls:
        engine_capacity(args)
    if not args.http:
        return 0
    me = [sys.executable, str(Path(__file__).resolve())]
    port = free_port()
    server = subprocess.Popen([*me, "--trivial", str(port)])
    try:
        wait_ready_trivial(f"http://127.0.0.1:{port}", server)
        ceiling, _, _ = load(f"http://127.0.0.1:{port}/", "json", "224", args)
    finally:
        server.terminate()
        server.wait()
    print(f"load generator ({args.gen_procs} procs x {args.concurrency} conns) against a "
          f"trivial server, JSON 224 bodies ({args.per_request} img/request): "
          f"{ceiling:,.0f} img/s")  # fmt: skip
    print("| front ends | body | image | img/s | front-end CPU ms/img | engine CPU ms/img | "
          "errors |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for n in [int(x) for x in args.frontends.split(",")]:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([*me, "--serve", str(port), str(n)])
        try:
            wait_ready(url, server)
            engine, fronts = processes(server.pid)
            for fmt in args.formats.split(","):
                for size in args.sizes.split(","):
                    rate, errors, used = load(
                        f"{url}/v1/classify", fmt, size, args, (engine, *fronts)
                    )
                    images = max(1.0, rate * args.seconds)
                    print(f"| {n} | {fmt} | {size} | {rate:,.0f} | "
                          f"{1000 * sum(used[1:]) / images:.2f} | {1000 * used[0] / images:.3f} | "
                          f"{errors} |", flush=True)  # fmt: skip
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    return 0


def wait_ready_trivial(url: str, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url, timeout=2)
            return
        time.sleep(0.1)
    raise SystemExit("trivial server not ready")


if __name__ == "__main__":
    raise SystemExit(main())
