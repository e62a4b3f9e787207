"""Faults: writers killed midway, corrupted bytes, a full disk, Redis going away and back."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from prompts_store import ChangeEvent, CorruptBlob, PromptStore, StoreUnavailable, fsio, open_store
from prompts_store.filesystem import FileStore
from prompts_store.redis import RedisStore

if TYPE_CHECKING:
    from conftest import Backend, RedisServer


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(fsio.TMP_PREFIX))


# -- a writer killed between writing its temp file and renaming it --------------------------------

_KILLED_WRITER = """
import os, sys, time
from prompts_store import open_store
store = open_store(sys.argv[1])
stop_at, calls = int(sys.argv[2]), []
real_replace = os.replace
def replace(src, dst):
    calls.append(dst)
    if len(calls) == stop_at:  # the temp file is written and fsynced; the rename never comes
        print("READY", os.path.basename(str(dst)), flush=True)
        time.sleep(60)
    return real_replace(src, dst)
os.replace = replace
store.put("victim", b"new bytes", {"v": 2})
"""


@pytest.mark.parametrize(
    ("stop_at", "target"), [(1, "v2.blob"), (2, "v2.json"), (3, "CURRENT")]
)  # fmt: skip
def test_writer_killed_before_rename_leaves_old_state(
    tmp_path: Path, run_python: Any, stop_at: int, target: str
) -> None:
    url = f"file://{tmp_path / 'store'}"
    store = open_store(url)
    store.put("victim", b"old bytes", {"v": 1})
    child = run_python(_KILLED_WRITER, url, str(stop_at), stdout=subprocess.PIPE)
    assert child.stdout is not None
    assert child.stdout.readline().split() == ["READY", target]
    child.send_signal(signal.SIGKILL)
    child.wait()

    folder = tmp_path / "store" / "victim"
    assert _leftovers(folder), "the child died with a temp file on disk"
    assert store.current("victim") == 1
    assert store.get("victim").data == b"old bytes"
    listed = [v.version for v in store.versions("victim")]
    # Killed before the record's rename: v2 does not exist. After it: v2 is complete but
    # not current (the pointer never moved). Never a version without its bytes.
    assert listed == ([1, 2] if target == "CURRENT" else [1])
    for version in listed:
        assert store.get("victim", version).data in (b"old bytes", b"new bytes")

    # The next writer cleans up and numbers on without a gap.
    assert store.put("victim", b"next") == listed[-1] + 1
    assert _leftovers(folder) == []
    assert sorted(p.name for p in folder.glob("v*.blob")) == [
        f"v{v}.blob" for v in range(1, listed[-1] + 2)
    ]


# -- corruption at rest ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: bytes([b[0] ^ 1]) + b[1:],  # one flipped bit
        lambda b: b[:-1],  # truncated
        lambda b: b + b"\0",  # grown
    ],
    ids=["bitflip", "truncated", "appended"],
)
def test_corrupted_blob_is_detected_on_read(backend: Backend, damage: Any) -> None:
    store = backend.open()
    store.put("fragile", b"precious checkpoint bytes")
    store.put("fragile", b"second version", activate=False)
    backend.corrupt("fragile", 1, damage)
    with pytest.raises(CorruptBlob, match="'fragile' version 1 is damaged"):
        store.get("fragile")
    with pytest.raises(CorruptBlob):
        store.get("fragile", 1)
    assert store.get("fragile", 2).data == b"second version"  # the damage stays contained
    assert [v.version for v in store.versions("fragile")] == [1, 2]


def test_missing_blob_file_is_corruption(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.put("gone", b"bytes")
    (tmp_path / "gone" / "v1.blob").unlink()
    with pytest.raises(CorruptBlob, match="data file is missing"):
        store.get("gone")


def test_unreadable_record_is_corruption(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.put("rec", b"bytes")
    (tmp_path / "rec" / "v1.json").write_text("{not json")
    with pytest.raises(CorruptBlob, match=r"record v1\.json is unreadable"):
        store.get("rec")


# -- a full disk ----------------------------------------------------------------------------------


def _disk_fills_at(monkeypatch: pytest.MonkeyPatch, nth: int) -> None:
    """Make the nth durable write (and every later one) fail with ENOSPC, half-written."""
    real, calls = fsio.write_all, []

    def write_all(fd: int, data: bytes) -> None:
        calls.append(fd)
        if len(calls) >= nth:
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(fsio, "write_all", write_all)


@pytest.mark.parametrize("nth", [1, 2, 3], ids=["blob", "record", "pointer"])
def test_disk_full_during_put_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nth: int
) -> None:
    store = FileStore(tmp_path)
    store.put("full", b"v1 bytes", {"n": 1})
    sub = store.watch()
    before = sorted(p.name for p in (tmp_path / "full").iterdir())
    _disk_fills_at(monkeypatch, nth)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="disk is full"):
        store.put("full", b"v2 bytes" * 1000, {"n": 2})
    assert time.monotonic() - started < 1
    monkeypatch.undo()

    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == before
    assert [v.version for v in store.versions("full")] == [1]
    assert store.current("full") == 1
    assert store.get("full").data == b"v1 bytes"
    assert sub.next(timeout=0.2) is None  # nothing happened, so nothing is announced
    assert store.put("full", b"v2") == 2  # space is back: business as usual
    sub.close()


def test_disk_full_during_activate_and_delete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(tmp_path)
    store.put("d", b"1")
    store.put("d", b"2")
    _disk_fills_at(monkeypatch, 1)
    with pytest.raises(StoreUnavailable, match="disk is full"):
        store.activate("d", 1, expected=2)
    with pytest.raises(StoreUnavailable, match="disk is full"):
        store.delete("d")
    monkeypatch.undo()
    assert store.current("d") == 2
    assert [v.version for v in store.versions("d")] == [1, 2]
    assert _leftovers(tmp_path / "d") == [] and _leftovers(tmp_path / "_deleted") == []


def test_file_store_unreachable_directory_is_unavailable(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s")
    (tmp_path / "s").rename(tmp_path / "moved")
    with pytest.raises(StoreUnavailable):
        store.ping()
    (tmp_path / "blocker").write_text("a file where a directory should be")
    with pytest.raises(StoreUnavailable, match="cannot create the store directory"):
        FileStore(tmp_path / "blocker" / "store")


# -- Redis going away and coming back -------------------------------------------------------------


def _events_until(sub: Any, want: Any, timeout: float = 10.0) -> list[ChangeEvent]:
    """Collect events until `want(events)` holds or the timeout passes."""
    events: list[ChangeEvent] = []
    deadline = time.monotonic() + timeout
    while not want(events) and time.monotonic() < deadline:
        event = sub.next(timeout=0.1)
        if event is not None:
            events.append(event)
    return events


def _all_unavailable(store: PromptStore) -> None:
    calls = {
        "put": lambda: store.put("m", b"x"),
        "get": lambda: store.get("m"),
        "versions": lambda: store.versions("m"),
        "names": store.names,
        "current": lambda: store.current("m"),
        "activate": lambda: store.activate("m", 1),
        "delete": lambda: store.delete("m"),
        "ping": store.ping,
        "watch": store.watch,
    }
    for what, call in calls.items():
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="did not answer"):
            call()
        assert time.monotonic() - started < 3, f"{what} took too long to give up"


@pytest.mark.parametrize("persisted", [False, True], ids=["data-lost", "data-kept"])
def test_redis_outage_and_recovery(private_redis: RedisServer, persisted: bool) -> None:
    store = RedisStore(private_redis.url, check_interval=0.2)
    try:
        store.put("m", b"before")
        sub = store.watch()
        assert [e.kind for e in _events_until(sub, lambda e: False, timeout=0.3)] == []
        if persisted:
            with private_redis.client() as raw:
                raw.save()  # a Redis with persistence comes back with its data
        private_redis.kill()

        _all_unavailable(store)
        assert sub.next(timeout=0.3) is None  # the watcher does not raise, it waits
        assert sub.connected is False

        private_redis.start()  # same port; the watcher's pub/sub connection is still dead
        version = store.put("m", b"after")  # the same store object works again
        assert store.get("m").data == b"after"
        assert version == (2 if persisted else 1)

        events = _events_until(sub, lambda e: ("m", "activate", version) in _kinds(e))
        assert ("m", "put", version) in _kinds(events)
        assert ("m", "activate", version) in _kinds(events)
        if persisted:  # caught up from the change log, event for event
            assert _kinds(events) == [("m", "put", 2), ("m", "activate", 2)]
        else:  # the data was lost: everything known is announced as gone, then the new state
            assert _kinds(events)[0] == ("m", "delete", None)
        assert sub.connected is True
        store.put("m", b"later")  # and pub/sub works again
        assert ("m", "put", version + 1) in _kinds(
            _events_until(sub, lambda e: len(e) >= 2, timeout=5)
        )
        sub.close()
    finally:
        store.close()


def _kinds(events: list[ChangeEvent]) -> list[tuple[str, str, int | None]]:
    return [(e.name, e.kind, e.version) for e in events]


def test_lost_pubsub_connection_is_resynced_from_the_log(redis_url: str) -> None:
    # check_interval is long, so only pub/sub (or its reconnection) can deliver quickly.
    store = RedisStore(redis_url, check_interval=30)
    try:
        sub = store.watch()
        store.put("p", b"1")  # pub/sub works: events arrive without waiting for a check
        assert _kinds(_events_until(sub, lambda e: len(e) >= 2, timeout=2)) == [
            ("p", "put", 1),
            ("p", "activate", 1),
        ]
        assert sub.next(timeout=0.3) is None  # let it read every message already sent
        store.client.client_kill_filter(_type="pubsub")  # drop the watcher's connection
        store.put("p", b"2")  # published while nobody listens
        store.activate("p", 1)
        started = time.monotonic()
        events = _events_until(sub, lambda e: len(e) >= 3, timeout=5)
        assert _kinds(events) == [("p", "put", 2), ("p", "activate", 2), ("p", "activate", 1)]
        assert time.monotonic() - started < 3
        sub.close()
    finally:
        store.close()


def test_watch_fails_fast_when_redis_is_down(private_redis: RedisServer) -> None:
    store = RedisStore(private_redis.url)
    private_redis.kill()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.watch()
        assert time.monotonic() - started < 3
    finally:
        store.close()
