"""A real redis-server of our own on a free loopback port, for the tests that need Redis.

Tests start and stop it themselves; none depends on a server someone started by hand.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server of our own on a free loopback port, with helpers for fault tests."""

    def __init__(self, workdir: Path, persist: bool = False) -> None:
        self.dir = workdir
        self.persist = persist  # append-only file, fsync always: data survives kill -9
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start on self.port (again) and wait until it answers PING."""
        assert REDIS_SERVER is not None
        log = self.dir / "redis.log"
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.persist else "no", "--appendfsync", "always",
             "--dir", str(self.dir), "--logfile", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self._answers_ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")
            time.sleep(0.01)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the server: no goodbye to clients, data not saved."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Kill and start again on the same port (data survives only if SAVEd before)."""
        self.kill()
        self.start()

    def client(self) -> redis.Redis:
        """A raw client for poking at keys; close it after use."""
        return redis.Redis.from_url(self.url)


def _start_server(workdir: Path, persist: bool = False) -> RedisServer:
    if REDIS_SERVER is None:
        pytest.fail(
            "redis-server is not installed, and the store tests need a real one: run `make test` "
            "(it installs the redis-server package) or `apt-get install redis-server`",
            pytrace=False,
        )
    last: Exception | None = None
    for _ in range(3):  # the free port can be taken between probing and binding
        server = RedisServer(workdir, persist)
        try:
            server.start()
            return server
        except RuntimeError as exc:
            last = exc
    raise RuntimeError(f"could not start redis-server: {last}")
