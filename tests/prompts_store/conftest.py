"""Fixtures for the store tests: a private redis-server, and one `backend` fixture that runs the
same test against the file store and the Redis store."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from prompts_store import PromptStore, open_store

REPO = Path(__file__).resolve().parents[2]
REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server of our own on a free loopback port, with helpers for fault tests."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
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
             "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(log)],
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


def _start_server(workdir: Path) -> RedisServer:
    if REDIS_SERVER is None:
        pytest.fail(
            "redis-server is not installed, and the store tests need a real one: run `make test` "
            "(it installs the redis-server package) or `apt-get install redis-server`",
            pytrace=False,
        )
    last: Exception | None = None
    for _ in range(3):  # the free port can be taken between probing and binding
        server = RedisServer(workdir)
        try:
            server.start()
            return server
        except RuntimeError as exc:
            last = exc
    raise RuntimeError(f"could not start redis-server: {last}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session (tests that kill it use `private_redis`)."""
    server = _start_server(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session server, emptied for this test."""
    with contextlib.closing(redis_server.client()) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for this test alone, free to kill and restart."""
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = _start_server(workdir)
    yield server
    server.kill()


# -- one fixture, both backends ------------------------------------------------------------------

_audit_watch: list[list[str]] = []  # while non-empty, file-system audit events are recorded
_FS_EVENTS = (
    "open", "os.mkdir", "os.listdir", "os.scandir", "os.rename", "os.remove", "os.rmdir",
    "os.chmod", "shutil.rmtree", "fcntl.flock",
)  # fmt: skip


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _audit_watch and event in _FS_EVENTS:
        _audit_watch[-1].append(f"{event}{args!r}")


sys.addaudithook(_audit)


@dataclass
class Backend:
    """A store under test plus what a test needs to reach behind it."""

    kind: str
    url: str
    root: Path | None = None  # file store directory
    server: RedisServer | None = None
    opened: list[PromptStore] = field(default_factory=list)

    def open(self, **options: Any) -> PromptStore:
        """Another store object on the same data (closed at teardown)."""
        store = open_store(self.url, **options)
        self.opened.append(store)
        return store

    @contextlib.contextmanager
    def untouched(self) -> Iterator[None]:
        """Fail if the block touches the files or sends Redis a command."""
        if self.server is None:
            _audit_watch.append([])
            try:
                yield
            finally:
                seen = _audit_watch.pop()
            assert seen == [], f"file system touched: {seen[:5]}"
            return
        with contextlib.closing(self.server.client()) as client:
            before = int(client.info("stats")["total_commands_processed"])
            yield
            after = int(client.info("stats")["total_commands_processed"])
        assert after - before == 1, f"{after - before - 1} Redis commands were sent"  # 1: INFO

    def corrupt(self, name: str, version: int, damage: Callable[[bytes], bytes]) -> None:
        """Replace a stored blob by damage(blob), behind the store's back."""
        if self.root is not None:
            path = self.root / name / f"v{version}.blob"
            path.write_bytes(damage(path.read_bytes()))
            return
        assert self.server is not None
        with contextlib.closing(self.server.client()) as client:
            key = f"ps:v:{name}:{version}"
            client.hset(key, "data", damage(client.hget(key, "data") or b""))


@pytest.fixture(params=["file", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The same test against each backend."""
    if request.param == "file":
        b = Backend("file", f"file://{tmp_path / 'store'}", root=tmp_path / "store")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        b = Backend("redis", request.getfixturevalue("redis_url"), server=server)
    yield b
    for store in b.opened:
        store.close()


@pytest.fixture
def store(backend: Backend) -> PromptStore:
    """A store on the backend under test."""
    return backend.open()


@pytest.fixture
def run_python() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start `python -c code args` with this repository importable; killed at teardown."""
    started: list[subprocess.Popen[str]] = []
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

    def run(code: str, *args: str, **popen: Any) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": pythonpath}
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], env=env, cwd=REPO, text=True, **popen
        )
        started.append(proc)
        return proc

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
