"""GET /v1/checkpoints with many names: one page of 25 against the whole list, on both stores.

    .venv/bin/python bench/checkpoint_list.py                  # 10,000 names, file and redis
    .venv/bin/python bench/checkpoint_list.py --names 2000 --stores file

The console pages and searches on the server; this prints what a page costs when the store holds
10,000 checkpoints, and what the first page after another writer's change costs (the file store
reuses its name listing until the store changes). The file store lives on /dev/shm when it
exists (10,000 fsynced writes on a disk would take longer than the reads measured), and Redis is
a private redis-server on loopback.
Bytes are placeholders: listing reads names, pointers and version records, never blobs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi.testclient import TestClient

from bench.common import backbone
from prompts_store import open_store
from service.app import create_app
from service.settings import Settings
from tests.redis_server import _start_server

TINY = str(Path(__file__).resolve().parents[1] / "tests" / "tiny_clip.json")


def fill(url: str, n: int) -> None:
    store = open_store(url)
    try:
        for i in range(n):
            store.put(f"ckpt-{i:05d}", b"x", {"method": "coop", "classes": 10})
    finally:
        store.close()


def timed(client: TestClient, path: str, repeats: int) -> float:
    """Median milliseconds of `repeats` requests (after one warm-up)."""
    assert client.get(path).status_code == 200
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        r = client.get(path)
        times.append(1000 * (time.perf_counter() - start))
        assert r.status_code == 200, r.text
    return statistics.median(times)


def after_change(client: TestClient, url: str, path: str, repeats: int) -> float:
    """Median milliseconds of a page right after another writer changed the store (the file
    store lists its names again then)."""
    writer = open_store(url)
    times = []
    try:
        for i in range(repeats):
            writer.put("ckpt-00000", b"x", {"method": "coop", "classes": 10}, activate=i % 2 == 0)
            start = time.perf_counter()
            assert client.get(path).status_code == 200
            times.append(1000 * (time.perf_counter() - start))
    finally:
        writer.close()
    return statistics.median(times)


def measure(url: str, n: int, repeats: int) -> dict[str, float]:
    settings = Settings(store=url, model="", model_config_path=TINY, pretrained="none",
                        runtime="torch", local_jobs=False)  # fmt: skip
    with TestClient(create_app(settings, backbone=backbone("", TINY))) as client:
        path = f"/v1/checkpoints?limit=25&offset={n // 2}"
        page = timed(client, path, repeats)
        changed = after_change(client, url, path, max(1, repeats // 4))
        search = timed(client, "/v1/checkpoints?limit=25&q=ckpt-0999", repeats)
        everything = timed(client, "/v1/checkpoints", max(1, repeats // 5))
    return {"page": page, "changed": changed, "search": search, "all": everything}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--stores", nargs="+", default=["file", "redis"])
    args = parser.parse_args()
    shm = Path("/dev/shm")
    print(f"{args.names} checkpoint names; median ms per GET (TestClient, in process)")
    print(f"{'store':<6} {'page of 25':>11} {'after a put':>12} {'search q=':>11} "
          f"{'all names':>11} {'all/page':>9}")  # fmt: skip
    for kind in args.stores:
        with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
            redis = _start_server(Path(tmp)) if kind == "redis" else None
            try:
                url = redis.url if redis is not None else f"file://{tmp}/store"
                fill(url, args.names)
                r = measure(url, args.names, args.repeats)
            finally:
                if redis is not None:
                    redis.kill()
        print(f"{kind:<6} {r['page']:>11.1f} {r['changed']:>12.1f} {r['search']:>11.1f} "
              f"{r['all']:>11.1f} {r['all'] / r['page']:>8.0f}x")  # fmt: skip


if __name__ == "__main__":
    main()
