"""The file store's change feed: a generation counter and a bounded JSON-lines log.

    _events/GENERATION   store-wide change counter (replaced atomically)
    _events/CHANGES      one JSON event per line; after compaction the first line is
                         {"floor": G}: events older than G were dropped
    _events/LOCK         writers hold it exclusively, readers shared

Writers bump the counter first, then append, under the exclusive lock: a reader that saw the
counter at G and then takes the shared lock finds every event up to G, and a writer that crashes
between the two steps only loses events (watchers' full resync covers that), never reuses one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from prompts_store import fsio
from prompts_store.base import ChangeEvent, ChangeKind, StoreUnavailable
from prompts_store.events import NameState

log = logging.getLogger(__name__)


class ChangeLog:
    """Writer side of `_events/`."""

    def __init__(self, folder: Path, max_bytes: int = 1 << 20) -> None:
        self.folder = folder
        self.max_bytes = max_bytes

    def generation(self) -> int:
        """The counter now (0 for a new store)."""
        return fsio.read_int(self.folder / "GENERATION") or 0

    def announce(self, name: str, changes: list[tuple[ChangeKind, int | None]]) -> None:
        """Log `changes` of `name`. They are already committed, so a failure here is logged,
        not raised: the caller's change stands and watchers catch up at a full resync."""
        try:
            with fsio.flocked(self.folder / "LOCK"):
                for entry in os.listdir(self.folder):
                    if entry.startswith(fsio.TMP_PREFIX):  # a writer died here
                        fsio.remove_quietly(self.folder / entry)
                gen = self.generation()
                fsio.atomic_write(self.folder / "GENERATION", f"{gen + len(changes)}\n".encode())
                lines = "".join(
                    dump_event(ChangeEvent(name, kind, version, gen + i)) + "\n"
                    for i, (kind, version) in enumerate(changes, start=1)
                )
                self._append(lines.encode())
        except (OSError, StoreUnavailable) as exc:
            log.error("change to %r committed but not announced: %s", name, exc)

    def _append(self, lines: bytes) -> None:
        path = self.folder / "CHANGES"
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                lines = b"\n" + lines  # a crashed append left half a line: terminate it
            fsio.write_all(fd, lines)
            size += len(lines)
        finally:
            os.close(fd)
        if size > self.max_bytes:
            # Keep the newer half; the header tells readers which generations are gone.
            kept = parse_log(fsio.read_bytes(path))[1]
            kept = kept[len(kept) // 2 :]
            body = [json.dumps({"floor": kept[0].generation if kept else 0})]
            body += [dump_event(e) for e in kept]
            fsio.atomic_write(path, ("\n".join(body) + "\n").encode())


class FileEvents:
    """EventSource for a Watcher: polls GENERATION, reads CHANGES from where it stopped."""

    def __init__(self, changelog: ChangeLog, snapshot: Callable[[], dict[str, NameState]]):
        self._log = changelog
        self._snapshot = snapshot
        self._inode: int | None = None
        self._offset = 0
        self._floor = 0
        self._buffer: list[ChangeEvent] = []

    def position(self) -> tuple[str, int]:
        return "", self._log.generation()

    def changes_since(self, after: int, upto: int) -> list[ChangeEvent] | None:
        folder = self._log.folder
        with fsio.flocked(folder / "LOCK", shared=True):
            try:
                with open(folder / "CHANGES", "rb") as f:
                    inode = os.fstat(f.fileno()).st_ino
                    if inode != self._inode:  # first read, or compacted: start over
                        self._inode, self._offset, self._floor, self._buffer = inode, 0, 0, []
                    f.seek(self._offset)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            except OSError as exc:
                raise fsio.unavailable(exc, "read the change log") from exc
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a half-written line waits for its end
        self._offset += len(complete)
        floor, events = parse_log(complete)
        self._floor = max(self._floor, floor)
        self._buffer.extend(events)
        out = [e for e in self._buffer if after < e.generation <= upto]
        self._buffer = [e for e in self._buffer if e.generation > upto]
        return None if self._floor > after + 1 else out

    def snapshot(self) -> dict[str, NameState]:
        return self._snapshot()

    def wait(self, timeout: float) -> bool:
        time.sleep(timeout)  # polling is the wake-up here
        return False

    def close(self) -> None:
        self._buffer = []


def parse_log(raw: bytes) -> tuple[int, list[ChangeEvent]]:
    """(floor, events) from CHANGES bytes; unreadable lines (torn appends) are skipped."""
    floor, events = 0, []
    for line in raw.splitlines():
        try:
            obj = json.loads(line)
            if "floor" in obj:
                floor = int(obj["floor"])
                continue
            version = obj["version"]
            events.append(
                ChangeEvent(
                    name=str(obj["name"]),
                    kind=obj["kind"],
                    version=None if version is None else int(version),
                    generation=int(obj["generation"]),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue
    return floor, events


def dump_event(event: ChangeEvent) -> str:
    """One log line (without the newline)."""
    return json.dumps(
        {
            "generation": event.generation,
            "name": event.name,
            "kind": event.kind,
            "version": event.version,
        }
    )
