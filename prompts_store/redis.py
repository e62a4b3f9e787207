"""The `redis://HOST:PORT/DB` store (standalone Redis; every write is one Lua script).

Keys, with the default prefix "ps" (names cannot contain ":", so keys never collide):

    ps:v:<name>:<N>     hash of version N: data, sha256, size, created_at, meta (immutable)
    ps:vers:<name>      sorted set of the stored version numbers
    ps:seq:<name>       last number handed out; survives delete, so numbers are never reused
    ps:cur:<name>       the current version number
    ps:names            set of names with versions
    ps:gen              store-wide change counter; ps:log holds the newest change events (JSON)
    ps:epoch            random id set by the first write: a new one means the data was lost
    channel ps:events   every change event is also PUBLISHed here (a wake-up for watchers)

Scripts allocate the number, write the version, move the pointer and announce in one atomic
step, so concurrent writers get gapless numbers and a crashed client leaves no torn version.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.client import PubSub
from redis.retry import Retry

from prompts_store.base import (
    DEFAULT_MAX_BLOB_BYTES,
    ChangeEvent,
    Conflict,
    CorruptBlob,
    NotFound,
    PromptStore,
    StoredVersion,
    StoreError,
    StoreUnavailable,
    VersionInfo,
    check_data,
    checksum,
    conflict_message,
    encode_meta,
    no_version_message,
    verify,
)
from prompts_store.events import NameState, Watcher
from prompts_store.names import check_name, check_version
from prompts_store.redis_scripts import ACTIVATE, DELETE, PUT

# Redis replies that mean "cannot serve now" rather than "bad request".
_UNAVAILABLE_REPLIES = ("OOM", "READONLY", "MASTERDOWN", "LOADING", "BUSY", "MISCONF", "NOREPL")


class RedisStore(PromptStore):
    """Checkpoint versions in Redis; many service replicas can share one."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "ps",
        max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
        socket_timeout: float = 2.0,
        check_interval: float = 1.0,
        full_resync_interval: float | None = 30.0,
        log_max: int = 10_000,
    ) -> None:
        self.prefix = prefix
        self.max_blob_bytes = max_blob_bytes
        self.log_max = log_max
        self._check_interval = check_interval
        self._full_resync = full_resync_interval
        self._where = url.split("@")[-1]  # never echo a password in messages
        # Short timeouts so the service notices an outage fast; no automatic retries, because
        # re-sending a write whose reply was lost would store a second version.
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._put = self.client.register_script(PUT)
        self._activate = self.client.register_script(ACTIVATE)
        self._delete = self.client.register_script(DELETE)
        self._watchers: weakref.WeakSet[Watcher] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r}, prefix={self.prefix!r})"

    def key(self, *parts: str | int) -> str:
        """The Redis key for `parts`, e.g. key("v", "eurosat", 3) -> "ps:v:eurosat:3"."""
        return ":".join([self.prefix, *map(str, parts)])

    @contextlib.contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """Translate redis-py errors into the store's: outages become StoreUnavailable."""
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(
                f"Redis at {self._where} did not answer while {doing} ({exc}); "
                "check that it is running and reachable"
            ) from exc
        except redis.ResponseError as exc:
            if any(word in str(exc) for word in _UNAVAILABLE_REPLIES):
                raise StoreUnavailable(f"Redis at {self._where} refused {doing}: {exc}") from exc
            raise StoreError(f"Redis at {self._where} failed {doing}: {exc}") from exc
        except redis.RedisError as exc:
            raise StoreUnavailable(f"Redis at {self._where} failed {doing}: {exc}") from exc

    def _args(self, name: str, *rest: str | bytes | int) -> list[str | bytes | int]:
        return [self.prefix, name, self.log_max, uuid.uuid4().hex, *rest]

    # -- writes -------------------------------------------------------------------------------

    def put(
        self,
        name: str,
        data: bytes,
        meta: Mapping[str, Any] | None = None,
        activate: bool = True,
    ) -> int:
        """Store a new version and return its number; make it current if `activate`."""
        name = check_name(name)
        data = check_data(data, self.max_blob_bytes)
        meta_json = encode_meta(meta)
        args = self._args(
            name, data, checksum(data), repr(time.time()), meta_json, "1" if activate else "0"
        )
        with self.errors(f"storing {name!r}"):
            return int(self._put(args=args))

    def activate(self, name: str, version: int, expected: int | None = None) -> int:
        """Point `name` at `version` (compare-and-set against `expected`; 0 = none current)."""
        name = check_name(name)
        version = check_version(version)
        if expected is not None:
            expected = check_version(expected, allow_zero=True)
        args = self._args(name, version, "" if expected is None else expected)
        with self.errors(f"activating {name!r}"):
            code, current = (int(x) for x in self._activate(args=args))
        if code == 3:
            raise NotFound(f"no checkpoint named {name!r}")
        if code == 2:
            raise NotFound(no_version_message(name, version, self._version_numbers(name)))
        if code == 1:
            assert expected is not None
            raise Conflict(conflict_message(name, expected, current or None), current or None)
        return version

    def delete(self, name: str) -> None:
        """Remove every version of `name` and its pointer, atomically."""
        name = check_name(name)
        with self.errors(f"deleting {name!r}"):
            deleted = int(self._delete(args=self._args(name)))
        if not deleted:
            raise NotFound(f"no checkpoint named {name!r}")

    # -- reads --------------------------------------------------------------------------------

    def get(self, name: str, version: int | None = None) -> StoredVersion:
        """Return a version (the current one if `version` is None), checksum verified."""
        name = check_name(name)
        if version is None:
            version = self.current(name)
            if version is None:
                raise NotFound(f"checkpoint {name!r} has no current version; activate one first")
        else:
            version = check_version(version)
        fields = ("data", "sha256", "size", "created_at", "meta")
        with self.errors(f"reading {name!r}"):
            row: list[Any] = self.client.hmget(self.key("v", name, version), fields)
        data, sha, size, created, meta = row
        if data is None:
            raise NotFound(no_version_message(name, version, self._version_numbers(name)))
        info = self._info(name, version, sha, size, created, meta)
        verify(name, version, data, info.sha256, info.size)
        return StoredVersion(name, version, data, info.meta, info.sha256, info.created_at)

    def versions(self, name: str) -> list[VersionInfo]:
        """Every stored version of `name`, oldest first, without data."""
        name = check_name(name)
        numbers = self._version_numbers(name)
        with self.errors(f"listing {name!r}"):
            pipe = self.client.pipeline(transaction=False)
            for v in numbers:
                pipe.hmget(self.key("v", name, v), ("sha256", "size", "created_at", "meta"))
            rows = pipe.execute()
        out = [self._info(name, v, *row) for v, row in zip(numbers, rows, strict=True) if row[0]]
        if not out:
            raise NotFound(f"no checkpoint named {name!r}")
        return out

    def names(self) -> list[str]:
        """Every name with at least one stored version, sorted."""
        with self.errors("listing names"):
            members = self.client.smembers(self.key("names"))
        return sorted(_text(m) for m in members)

    def current(self, name: str) -> int | None:
        """The current version of `name`, None if none is active; NotFound if no such name."""
        name = check_name(name)
        with self.errors(f"reading {name!r}"):
            pipe = self.client.pipeline(transaction=True)
            pipe.get(self.key("cur", name))
            pipe.sismember(self.key("names"), name)
            pointer, exists = pipe.execute()
        if not exists:
            raise NotFound(f"no checkpoint named {name!r}")
        return None if pointer is None else int(pointer)

    def _version_numbers(self, name: str) -> list[int]:
        with self.errors(f"listing {name!r}"):
            numbers: list[Any] = self.client.zrange(self.key("vers", name), 0, -1)
        return [int(v) for v in numbers]

    def _info(
        self, name: str, version: int, sha: Any, size: Any, created: Any, meta: Any
    ) -> VersionInfo:
        try:
            return VersionInfo(
                name=name,
                version=version,
                size=int(size),
                sha256=_text(sha),
                created_at=float(created),
                meta=dict(json.loads(meta)),
            )
        except (AttributeError, TypeError, ValueError):
            raise CorruptBlob(
                f"checkpoint {name!r} version {version} is damaged: its record in Redis is "
                "unreadable; delete and re-upload it"
            ) from None

    # -- health and events --------------------------------------------------------------------

    def ping(self) -> None:
        """Raise StoreUnavailable unless Redis answers PING."""
        with self.errors("pinging"):
            self.client.ping()

    def watch(self) -> Watcher:
        """Subscribe to changes made after this call (pub/sub plus periodic resync)."""
        watcher = Watcher(
            _RedisEvents(self),
            check_interval=self._check_interval,
            full_resync_interval=self._full_resync,
        )
        self._watchers.add(watcher)
        return watcher

    def close(self) -> None:
        """Close open subscriptions and every pooled connection."""
        for watcher in list(self._watchers):
            watcher.close()
        self.client.close()

    def snapshot(self) -> dict[str, NameState]:
        """Every name's pointer and newest version (what a watcher diffs against)."""
        names = self.names()
        with self.errors("reading pointers"):
            pipe = self.client.pipeline(transaction=True)
            for name in names:
                pipe.get(self.key("cur", name))
                pipe.zrange(self.key("vers", name), -1, -1)
            rows = pipe.execute()
        out = {}
        for name, pointer, latest in zip(names, rows[::2], rows[1::2], strict=True):
            if latest:
                out[name] = NameState(None if pointer is None else int(pointer), int(latest[0]))
        return out


class _RedisEvents:
    """EventSource over ps:gen / ps:log, woken early by the ps:events channel."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._pubsub: PubSub | None = None
        self._retry_at = 0.0
        self._backoff = 0.0
        self._subscribe()

    def _subscribe(self) -> None:
        pubsub = self._store.client.pubsub(ignore_subscribe_messages=True)
        try:
            with self._store.errors("subscribing to changes"):
                pubsub.subscribe(self._store.key("events"))
        except StoreUnavailable:
            pubsub.close()
            raise
        self._pubsub = pubsub

    def _drop(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                self._pubsub.close()
            self._pubsub = None

    def position(self) -> tuple[str, int]:
        with self._store.errors("reading the generation"):
            epoch, gen = self._store.client.mget(self._store.key("epoch"), self._store.key("gen"))
        return _text(epoch or b""), int(gen or 0)

    def changes_since(self, after: int, upto: int) -> list[ChangeEvent] | None:
        found: dict[int, ChangeEvent] = {}
        start, step = 0, 256
        with self._store.errors("reading the change log"):
            while True:
                items: list[Any] = self._store.client.lrange(
                    self._store.key("log"), start, start + step - 1
                )
                older = False
                for raw in items:
                    event = _parse_event(raw)
                    if event is None:
                        continue
                    if event.generation <= after:
                        older = True
                        break
                    if event.generation <= upto:  # newer ones are for the next round
                        found[event.generation] = event  # keyed: pushes shift the indices
                if older or len(items) < step:
                    break
                start += step
        if sorted(found) != list(range(after + 1, upto + 1)):
            return None  # trimmed or lost: the watcher diffs a snapshot instead
        return [found[g] for g in sorted(found)]

    def snapshot(self) -> dict[str, NameState]:
        return self._store.snapshot()

    def wait(self, timeout: float) -> bool:
        now = time.monotonic()
        if self._pubsub is None:
            if now < self._retry_at:
                time.sleep(min(timeout, self._retry_at - now))
                return False
            try:
                self._subscribe()
            except StoreUnavailable:
                self._backoff = min(2.0, max(0.1, self._backoff * 2))
                self._retry_at = now + self._backoff
                return False
            self._backoff = 0.0
            return True  # subscribed again: check the log for what pub/sub missed meanwhile
        try:
            # Short slices so that close() from another thread takes effect quickly.
            message = self._pubsub.get_message(timeout=min(timeout, 0.25))
        except Exception:  # a dead socket surfaces as several redis-py and OS error types
            self._drop()
            return True
        return message is not None

    def close(self) -> None:
        self._drop()


def _parse_event(raw: bytes) -> ChangeEvent | None:
    try:
        obj = json.loads(raw)
        version = obj.get("version")
        return ChangeEvent(
            name=str(obj["name"]),
            kind=obj["kind"],
            version=None if version is None else int(version),
            generation=int(obj["generation"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _text(value: Any) -> str:
    """Decode a reply (bytes, since the client does not decode) to str."""
    return value.decode() if isinstance(value, bytes) else str(value)
