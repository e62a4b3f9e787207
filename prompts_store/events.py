"""Change subscriptions shared by the backends.

Each backend keeps a store-wide generation counter and a bounded change log, and offers an
`EventSource`. The `Watcher` turns that into a gap-free, duplicate-free event stream: it reads the
log from the last generation it saw, and falls back to diffing a snapshot of every name's pointer
when the log cannot tell (log trimmed, store replaced, a writer died between its change and its
log entry). Backends may add a fast wake-up (Redis pub/sub); correctness never depends on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from prompts_store.base import ChangeEvent, StoreUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NameState:
    """What a watcher knows of one name: its pointer and its newest version."""

    current: int | None
    latest: int


class EventSource(Protocol):
    """What a backend provides so that a Watcher can follow it."""

    def position(self) -> tuple[str, int]:
        """(epoch, generation): the epoch changes when the store was replaced by an empty one."""
        ...

    def changes_since(self, after: int, upto: int) -> list[ChangeEvent] | None:
        """Logged events with after < generation <= upto, in order; None if the log was trimmed."""
        ...

    def snapshot(self) -> dict[str, NameState]:
        """Every name's pointer and newest version, read now."""
        ...

    def wait(self, timeout: float) -> bool:
        """Block up to `timeout` s for a hint of a change; True means "check now"."""
        ...

    def close(self) -> None:
        """Release what the source holds (connections)."""
        ...


class Watcher:
    """A Subscription over an EventSource: `next(timeout)`, iteration, `close()`.

    Backend outages never raise out of `next`: the watcher retries with backoff, exposes
    `connected`, and catches up (log or snapshot diff) once the backend answers again.
    """

    def __init__(
        self,
        source: EventSource,
        *,
        check_interval: float,
        full_resync_interval: float | None = 30.0,
        max_backoff: float = 2.0,
    ) -> None:
        self._source = source
        self._check_interval = check_interval
        self._full_interval = full_resync_interval
        self._max_backoff = max_backoff
        self._pending: deque[ChangeEvent] = deque()
        self._busy = threading.Lock()  # held by next(); close() from elsewhere defers to it
        self._closed = False
        self._released = False
        self._backoff = 0.0
        self.connected = True
        try:
            # The baseline: events are for changes after this point.
            self._epoch, self._gen = source.position()
            self._known = source.snapshot()
        except BaseException:
            source.close()
            raise
        now = time.monotonic()
        self._next_check = now + check_interval
        self._next_full = now + full_resync_interval if full_resync_interval else float("inf")

    def next(self, timeout: float | None = None) -> ChangeEvent | None:
        """Return the next event, or None after `timeout` seconds or once closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._busy:
            try:
                return self._next(deadline)
            finally:
                if self._closed:
                    self._release()

    def __iter__(self) -> Iterator[ChangeEvent]:
        while True:
            event = self.next()
            if event is None:  # only when closed: next() without timeout blocks otherwise
                return
            yield event

    def close(self) -> None:
        """Stop the subscription; a next() blocked in another thread returns None soon."""
        self._closed = True
        if self._busy.acquire(blocking=False):
            try:
                self._release()
            finally:
                self._busy.release()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._source.close()

    def _next(self, deadline: float | None) -> ChangeEvent | None:
        wake = False
        while True:
            if self._pending:
                return self._pending.popleft()
            if self._closed:
                return None
            now = time.monotonic()
            if wake or now >= self._next_check:
                wake = False
                self._check(now)
                continue
            if deadline is not None and now >= deadline:
                return None
            until = self._next_check if deadline is None else min(self._next_check, deadline)
            try:
                wake = self._source.wait(max(0.0, until - now))
            except StoreUnavailable:
                wake = False

    def _check(self, now: float) -> None:
        try:
            self._sync(now)
        except StoreUnavailable as exc:
            if self.connected:
                log.warning("store watcher lost the backend, retrying: %s", exc)
            self.connected = False
            self._backoff = min(self._max_backoff, max(0.1, self._backoff * 2))
            self._next_check = now + self._backoff
            return
        if not self.connected:
            log.info("store watcher reconnected")
        self.connected = True
        self._backoff = 0.0
        self._next_check = now + self._check_interval

    def _sync(self, now: float) -> None:
        epoch, gen = self._source.position()
        if epoch != self._epoch and self._epoch != "":
            # The store was replaced (e.g. Redis restarted without persistence): nothing known
            # survives; announce every old name as deleted, then the new state.
            self._reset(epoch, gen)
            return
        if gen < self._gen:
            self._reset(epoch, gen)  # counter went backwards: same story
            return
        self._epoch = epoch
        if gen > self._gen:
            events = self._source.changes_since(self._gen, gen)
            if events is None:
                self._diff(self._source.snapshot(), gen)
            else:
                for event in events:
                    self._apply(event)
            self._gen = gen
        elif now >= self._next_full:
            # Safety net for changes that never reached the log (a writer died in between).
            # Only trust the snapshot if no change happened while it was taken.
            snap = self._source.snapshot()
            if self._source.position() == (epoch, gen):
                self._diff(snap, gen)
        if now >= self._next_full and self._full_interval:
            self._next_full = now + self._full_interval

    def _apply(self, event: ChangeEvent) -> None:
        """Queue a logged event unless the known state already reflects it (after a diff)."""
        old = self._known.get(event.name)
        if event.kind == "delete":
            if old is None:
                return
            del self._known[event.name]
        elif event.kind == "put":
            assert event.version is not None
            if old is not None and event.version <= old.latest:
                return
            self._known[event.name] = NameState(old.current if old else None, event.version)
        else:
            assert event.version is not None
            if old is not None and old.current == event.version:
                return
            latest = max(old.latest if old else 0, event.version)
            self._known[event.name] = NameState(event.version, latest)
        self._pending.append(event)

    def _diff(self, snap: dict[str, NameState], gen: int) -> None:
        """Queue synthesized events that take the known state to `snap`."""
        for name in sorted(set(self._known) - set(snap)):
            self._pending.append(ChangeEvent(name, "delete", None, gen))
        for name in sorted(snap):
            new, old = snap[name], self._known.get(name)
            if old is None or new.latest > old.latest:
                self._pending.append(ChangeEvent(name, "put", new.latest, gen))
            if new.current is not None and (old is None or old.current != new.current):
                self._pending.append(ChangeEvent(name, "activate", new.current, gen))
        self._known = dict(snap)

    def _reset(self, epoch: str, gen: int) -> None:
        snap = self._source.snapshot()
        for name in sorted(self._known):
            self._pending.append(ChangeEvent(name, "delete", None, gen))
        self._known = {}
        self._diff(snap, gen)
        self._epoch, self._gen = epoch, gen
