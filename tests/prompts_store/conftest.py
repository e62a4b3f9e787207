"""Fixtures for the store tests: a private redis-server, and one `backend` fixture that runs the
same test against the file store and the Redis store."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from prompts_store import PromptStore, open_store
from tests.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[2]

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
