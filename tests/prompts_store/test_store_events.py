"""Watchers catch up when the change log cannot tell them everything."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from prompts_store import ChangeEvent
from prompts_store.changelog import ChangeLog
from prompts_store.filesystem import FileStore
from prompts_store.redis import RedisStore

if TYPE_CHECKING:
    from conftest import Backend


def _kinds(events: list[ChangeEvent]) -> list[tuple[str, str, int | None]]:
    return [(e.name, e.kind, e.version) for e in events]


def _drain(sub: Any, quiet: float = 0.4, timeout: float = 5.0) -> list[ChangeEvent]:
    """Every event until none came for `quiet` seconds."""
    events = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = sub.next(timeout=quiet)
        if event is None:
            break
        events.append(event)
    return events


def _churn(store: Any) -> None:
    """Changes whose end state is: keep@3 current (1..3 stored), gone deleted, new@1 inactive."""
    for i in range(3):
        store.put("keep", f"k{i}".encode())
    store.activate("keep", 1)
    store.activate("keep", 3)
    store.delete("gone")
    store.put("new", b"n", activate=False)


def _small_log_store(backend: Backend) -> Any:
    if backend.kind == "file":
        return backend.open(log_max_bytes=400)
    return backend.open(log_max=3)


def test_lagging_watcher_gets_the_end_state_after_the_log_was_trimmed(backend: Backend) -> None:
    store = _small_log_store(backend)
    store.put("gone", b"g")
    sub = store.watch()
    _churn(store)  # the watcher reads nothing meanwhile; the log drops what it has not read
    events = _drain(sub)
    sub.close()
    assert sorted(_kinds(events), key=str) == sorted(
        [("gone", "delete", None), ("keep", "put", 3), ("keep", "activate", 3), ("new", "put", 1)],
        key=str,
    )


def test_watcher_that_keeps_up_sees_every_event_across_trimming(backend: Backend) -> None:
    store = _small_log_store(backend)
    sub = store.watch()
    seen = []
    for i in range(1, 13):
        store.put("steady", f"{i}".encode(), activate=False)
        seen.append(sub.next(timeout=3))
    assert sub.next(timeout=0.2) is None
    sub.close()
    assert _kinds(seen) == [("steady", "put", i) for i in range(1, 13)]
    if backend.root is not None:  # the log stayed bounded
        assert (backend.root / "_events" / "CHANGES").stat().st_size <= 400


def test_unannounced_change_is_found_by_the_full_resync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(tmp_path, full_resync_interval=0.3)
    sub = store.watch()
    # A writer that died after committing its change but before logging it.
    monkeypatch.setattr(ChangeLog, "announce", lambda *a, **k: None)
    store.put("silent", b"s")
    monkeypatch.undo()
    assert sub.next(timeout=0.1) is None  # the log knows nothing
    events = _drain(sub, quiet=1.0)
    sub.close()
    assert _kinds(events) == [("silent", "put", 1), ("silent", "activate", 1)]


def test_close_from_another_thread_wakes_a_blocked_reader(backend: Backend) -> None:
    store = backend.open()
    sub = store.watch()
    result: list[Any] = []
    reader = threading.Thread(target=lambda: result.append(sub.next()))  # no timeout: blocks
    reader.start()
    time.sleep(0.2)
    assert reader.is_alive()
    started = time.monotonic()
    sub.close()
    reader.join(timeout=3)
    assert not reader.is_alive() and result == [None]
    assert time.monotonic() - started < 1.5


def test_closing_the_store_closes_its_watchers(backend: Backend) -> None:
    store = backend.open()
    sub = store.watch()
    store.close()
    assert sub.next(timeout=0.1) is None
    if isinstance(store, RedisStore):
        reopened = backend.open()
        reopened.put("after-close", b"x")
        assert sub.next(timeout=0.3) is None  # closed for good
