"""deploy/redis.conf on a real redis-server, and the backup/restore steps of deploy/README.md:
a BGSAVE snapshot restores every checkpoint version and pointer into an empty data directory,
and the append-only file is rebuilt from it before Redis runs with the deploy config again."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from prompts_store import open_store
from tests.deploy.common import DEPLOY
from tests.redis_server import REDIS_SERVER, _free_port


def local_conf(tmp: Path) -> Path:
    """deploy/redis.conf with `dir /data` (the container's volume) pointed at `tmp`: Redis
    changes into `dir` while it reads the file, before any command-line override."""
    text = (DEPLOY / "redis.conf").read_text()
    assert "\ndir /data\n" in text
    conf = tmp / "redis.conf"
    conf.write_text(text.replace("\ndir /data\n", f"\ndir {tmp}\n"))
    return conf


def start(conf: Path, data: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """redis-server on the deploy config; only where it listens and writes is changed."""
    assert REDIS_SERVER is not None
    proc = subprocess.Popen(
        [REDIS_SERVER, str(conf), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
         "--logfile", str(data.parent / f"{data.name}.log"), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            assert proc.poll() is None, (data.parent / f"{data.name}.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.02)


def wait(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_snapshot_backup_restores_the_store(tmp_path: Path) -> None:
    conf = local_conf(tmp_path)
    live, restored, backup = tmp_path / "live", tmp_path / "restored", tmp_path / "backup"
    for d in (live, restored, backup):
        d.mkdir()
    port = _free_port()
    proc = start(conf, live, port)
    try:
        client = redis.Redis(port=port)
        config = client.config_get("append*")
        assert config["appendonly"] == "yes" and config["appendfsync"] == "everysec"
        url = f"redis://127.0.0.1:{port}/0"
        store = open_store(url)
        for i in (1, 2, 3):
            store.put("pets", f"v{i}".encode(), {"method": "coop"})
        store.activate("pets", 2)
        store.close()
        # the README's backup: BGSAVE, wait until no change is unsaved, copy dump.rdb away
        client.bgsave()

        def saved() -> bool:
            info = client.info("persistence")
            done = info["rdb_bgsave_in_progress"] == 0 and info["rdb_changes_since_last_save"] == 0
            return bool(done and info["rdb_last_bgsave_status"] == "ok")

        wait(saved, "BGSAVE")
        shutil.copy(live / "dump.rdb", backup / "dump.rdb")
        client.close()
    finally:
        proc.kill()
        proc.wait()

    # the README's restore: dump.rdb into an empty volume, start with AOF off (else Redis would
    # load the empty AOF and ignore the snapshot), turn AOF on (rewrites it from memory), restart
    shutil.copy(backup / "dump.rdb", restored / "dump.rdb")
    port = _free_port()
    proc = start(conf, restored, port, "--appendonly", "no")
    client = redis.Redis(port=port)
    try:
        client.config_set("appendonly", "yes")
        wait(lambda: client.info("persistence")["aof_rewrite_in_progress"] == 0
             and client.info("persistence")["aof_enabled"] == 1, "AOF rewrite")  # fmt: skip
    finally:
        client.close()
        proc.terminate()
        proc.wait()
    proc = start(conf, restored, port)  # the deploy config as is: loads the rebuilt AOF
    try:
        store = open_store(f"redis://127.0.0.1:{port}/0")
        assert [v.version for v in store.versions("pets")] == [1, 2, 3]
        assert store.current("pets") == 2 and store.get("pets").data == b"v2"
        store.close()
    finally:
        proc.kill()
        proc.wait()
