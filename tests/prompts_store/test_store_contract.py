"""The PromptStore contract, run against every backend (see the `backend` fixture)."""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import prompts_store
from prompts_store import (
    MAX_META_BYTES,
    ChangeEvent,
    Conflict,
    InvalidMeta,
    InvalidName,
    NotFound,
    PromptStore,
    TooLarge,
    open_store,
)
from prompts_store.filesystem import FileStore
from prompts_store.redis import RedisStore

if TYPE_CHECKING:
    from conftest import Backend


def test_backends_implement_the_protocol(store: PromptStore) -> None:
    assert isinstance(store, PromptStore)


def test_put_then_get_returns_bytes_meta_and_checksum(store: PromptStore) -> None:
    t0 = time.time()
    assert store.put("eurosat", b"first", {"method": "coop", "metrics": {"acc": 0.9}}) == 1
    assert store.put("eurosat", b"second") == 2
    t1 = time.time()

    latest = store.get("eurosat")
    assert (latest.name, latest.version, latest.data, latest.meta) == ("eurosat", 2, b"second", {})
    first = store.get("eurosat", 1)
    assert first.data == b"first"
    assert first.meta == {"method": "coop", "metrics": {"acc": 0.9}}
    assert first.sha256 == hashlib.sha256(b"first").hexdigest()
    assert first.size == 5
    assert t0 <= first.created_at <= latest.created_at <= t1


def test_empty_blob_is_a_version(store: PromptStore) -> None:
    assert store.put("empty", b"") == 1
    assert store.get("empty").data == b""


def test_versions_names_and_current(store: PromptStore) -> None:
    store.put("pets", b"p1", {"i": 1})
    store.put("pets", b"p2", {"i": 2}, activate=False)
    store.put("cars", b"c1")
    store.put("dtd", b"d1", activate=False)

    infos = store.versions("pets")
    assert [(i.version, i.meta, i.size) for i in infos] == [(1, {"i": 1}, 2), (2, {"i": 2}, 2)]
    assert not hasattr(infos[0], "data")
    assert infos[1].sha256 == hashlib.sha256(b"p2").hexdigest()
    assert store.names() == ["cars", "dtd", "pets"]
    assert store.current("pets") == 1  # put(activate=False) left the pointer alone
    assert store.current("dtd") is None
    with pytest.raises(NotFound, match="no current version"):
        store.get("dtd")
    assert store.get("dtd", 1).data == b"d1"


def test_activate_moves_the_pointer_and_rolls_back(store: PromptStore) -> None:
    for i in range(1, 4):
        store.put("flowers", f"v{i}".encode())
    assert store.current("flowers") == 3
    assert store.activate("flowers", 1) == 1  # rollback to an older version
    assert store.current("flowers") == 1
    assert store.get("flowers").data == b"v1"
    assert store.activate("flowers", 3) == 3
    assert store.get("flowers").data == b"v3"
    assert [v.version for v in store.versions("flowers")] == [1, 2, 3]  # history kept


def test_activate_compare_and_set(store: PromptStore) -> None:
    store.put("food", b"a")
    store.put("food", b"b")  # current: 2
    with pytest.raises(Conflict, match="expected version 1") as err:
        store.activate("food", 1, expected=1)
    assert err.value.current == 2
    assert store.current("food") == 2  # a lost compare changes nothing
    assert store.activate("food", 1, expected=2) == 1
    assert store.current("food") == 1


def test_expected_zero_means_nothing_current(store: PromptStore) -> None:
    store.put("aircraft", b"a", activate=False)
    assert store.activate("aircraft", 1, expected=0) == 1
    with pytest.raises(Conflict) as err:
        store.activate("aircraft", 1, expected=0)
    assert err.value.current == 1


def test_activate_missing_raises_not_found(store: PromptStore) -> None:
    with pytest.raises(NotFound, match="no checkpoint named 'ghost'"):
        store.activate("ghost", 1)
    store.put("sun", b"x")
    store.put("sun", b"y")
    with pytest.raises(NotFound, match="has no version 7; it has versions 1-2"):
        store.activate("sun", 7)
    with pytest.raises(NotFound):
        store.activate("sun", 7, expected=2)  # missing version wins over the compare
    assert store.current("sun") == 2


@pytest.mark.parametrize("bad", [0, -1, True, "1", 1.0, None])
def test_bad_version_numbers_are_rejected(store: PromptStore, bad: Any) -> None:
    store.put("ucf", b"x")
    with pytest.raises(InvalidName, match="version must be an integer"):
        store.activate("ucf", bad)
    if bad is not None:  # get(name, None) means "the current version"
        with pytest.raises(InvalidName, match="version must be an integer"):
            store.get("ucf", bad)
    with pytest.raises(InvalidName, match="version must be an integer >= 0"):
        store.activate("ucf", 1, expected=-1)
    assert store.current("ucf") == 1


def test_delete_removes_everything_and_numbers_are_never_reused(store: PromptStore) -> None:
    store.put("caltech", b"1")
    store.put("caltech", b"2")
    store.put("other", b"o")
    store.delete("caltech")
    assert store.names() == ["other"]
    for call in (
        lambda: store.get("caltech"),
        lambda: store.get("caltech", 1),
        lambda: store.versions("caltech"),
        lambda: store.current("caltech"),
        lambda: store.activate("caltech", 1),
        lambda: store.delete("caltech"),
    ):
        with pytest.raises(NotFound):
            call()
    # A re-upload continues the numbering: "caltech@1" must never name other bytes.
    assert store.put("caltech", b"3") == 3
    assert [v.version for v in store.versions("caltech")] == [3]
    assert store.get("other").data == b"o"


def test_not_found_messages(store: PromptStore) -> None:
    with pytest.raises(NotFound, match="no checkpoint named 'nope'"):
        store.get("nope")
    with pytest.raises(NotFound, match="no checkpoint named 'nope'"):
        store.versions("nope")
    store.put("yes", b"1")
    with pytest.raises(NotFound, match="has no version 2; it has versions 1"):
        store.get("yes", 2)
    assert store.names() == ["yes"]


BAD_NAMES = ["../x", "a/b", "a\\b", "a\x00b", "x" * 1000, "", ".", "..", ".hidden", "-flag",
             "_events", "a:b", "a b", "é", "a\n", "x" * 65]  # fmt: skip


def test_invalid_names_never_reach_the_backend(backend: Backend, store: PromptStore) -> None:
    calls = [
        lambda n: store.put(n, b"data"),
        lambda n: store.get(n),
        lambda n: store.get(n, 1),
        lambda n: store.versions(n),
        lambda n: store.current(n),
        lambda n: store.activate(n, 1),
        lambda n: store.delete(n),
    ]
    with backend.untouched():
        for name in [*BAD_NAMES, None, 7, b"bytes"]:
            for call in calls:
                with pytest.raises(InvalidName, match="name"):
                    call(name)
    assert store.names() == []
    if backend.root is not None:
        assert not (backend.root.parent / "x").exists()


def test_untouched_guard_notices_backend_access(backend: Backend, store: PromptStore) -> None:
    with pytest.raises(AssertionError, match=r"touched|commands were sent"), backend.untouched():
        store.names()


def test_invalid_name_is_a_value_error() -> None:
    assert issubclass(InvalidName, ValueError)
    with pytest.raises(ValueError, match="letters, digits"):
        prompts_store.check_name("a/b")


@pytest.mark.parametrize("name", ["a", "Z", "7", "A-1_b.c", "v1.2.3", "x" * 64, "a..b"])
def test_valid_names_round_trip(store: PromptStore, name: str) -> None:
    assert store.put(name, name.encode()) == 1
    assert store.get(name).data == name.encode()
    assert store.names() == [name]


def test_meta_bounds(store: PromptStore) -> None:
    big = {"blob": "x" * MAX_META_BYTES}
    with pytest.raises(TooLarge, match="metadata"):
        store.put("m", b"x", big)
    for bad in ({"s": {1, 2}}, {"n": math.nan}, {1: "int key"}, ["not", "a", "dict"]):
        with pytest.raises(InvalidMeta):
            store.put("m", b"x", bad)  # type: ignore[arg-type]
    assert store.names() == []  # nothing half-stored
    fits = {"blob": "x" * (MAX_META_BYTES - 100)}
    assert store.put("m", b"x", fits) == 1
    assert store.get("m").meta == fits


def test_data_bounds(backend: Backend) -> None:
    small = backend.open(max_blob_bytes=10)
    with pytest.raises(TooLarge, match="at most 10"):
        small.put("big", b"x" * 11)
    assert small.put("big", bytearray(b"x" * 10)) == 1
    assert small.get("big").data == b"x" * 10
    with pytest.raises(TypeError):
        small.put("big", "text")  # type: ignore[arg-type]


def _drain(sub: Any, count: int, timeout: float = 5.0) -> list[ChangeEvent]:
    events = []
    deadline = time.monotonic() + timeout
    while len(events) < count and time.monotonic() < deadline:
        event = sub.next(timeout=deadline - time.monotonic())
        if event is not None:
            events.append(event)
    return events


def test_watch_yields_put_activate_and_delete(store: PromptStore) -> None:
    store.put("before", b"x")  # not an event: it happened before watch()
    sub = store.watch()
    try:
        store.put("w", b"1")
        store.put("w", b"2", activate=False)
        store.activate("w", 2, expected=1)
        store.activate("w", 2)  # already current: no change, no event
        store.delete("w")
        events = _drain(sub, 5)
        assert [(e.name, e.kind, e.version) for e in events] == [
            ("w", "put", 1),
            ("w", "activate", 1),
            ("w", "put", 2),
            ("w", "activate", 2),
            ("w", "delete", None),
        ]
        gens = [e.generation for e in events]
        assert gens == sorted(set(gens))
        assert sub.next(timeout=0.2) is None  # nothing else happened
    finally:
        sub.close()
    assert sub.next(timeout=0.1) is None  # closed


def test_watch_iterates_until_closed(store: PromptStore) -> None:
    sub = store.watch()
    store.put("it", b"1")
    seen = []
    for event in sub:
        seen.append(event.kind)
        if len(seen) == 2:
            sub.close()
    assert seen == ["put", "activate"]


def test_ping(store: PromptStore) -> None:
    store.ping()  # healthy: no exception


def test_open_store_urls(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = open_store("file://rel/store")
    assert isinstance(rel, FileStore) and rel.root == tmp_path / "rel" / "store"
    absolute = open_store(f"file://{tmp_path}/abs")
    assert isinstance(absolute, FileStore) and absolute.root == tmp_path / "abs"
    red = open_store(redis_url + "?prefix=alt")
    try:
        assert isinstance(red, RedisStore) and red.prefix == "alt"
        red.put("k", b"v")
        assert red.client.exists("alt:v:k:1") == 1
    finally:
        red.close()
    for bad in ("s3://bucket", "file://", "/plain/path", "redis:/x"):
        with pytest.raises(ValueError, match="store URL"):
            open_store(bad)


def test_names_follow_another_writers_puts_and_deletes(
    backend: Backend, store: PromptStore
) -> None:
    """names() of one store sees what another (another process's) put and deleted, at once."""
    other = backend.open()  # closed at teardown
    assert other.names() == []
    store.put("a", b"1")
    assert other.names() == ["a"]
    store.put("b", b"1", activate=False)
    store.activate("b", 1)
    assert other.names() == ["a", "b"]
    store.delete("a")
    assert other.names() == ["b"]
    other.put("c", b"1")
    assert store.names() == ["b", "c"]


def test_file_names_are_listed_again_only_after_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10,000 names cost one directory listing each: a repeated names() with no change between
    must not pay it again (the console's paged list calls it on every page)."""
    store = FileStore(tmp_path / "s")
    try:
        for name in ("x", "y"):
            store.put(name, b"1")
        listed: list[str] = []
        real = store._committed
        monkeypatch.setattr(store, "_committed", lambda n: listed.append(n) or real(n))
        assert store.names() == ["x", "y"] and len(listed) == 2
        assert store.names() == ["x", "y"] and len(listed) == 2  # unchanged: reused
        store.put("z", b"1")  # put calls _committed itself: count the listing only
        before = len(listed)
        assert store.names() == ["x", "y", "z"] and len(listed) - before == 3
    finally:
        store.close()
