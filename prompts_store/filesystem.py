"""The `file://DIR` store: one directory per name, atomic renames, flock for writers.

Layout under DIR:

    <name>/v<N>.blob      the bytes of version N (immutable)
    <name>/v<N>.json      its record: sha256, size, created_at, meta. Writing it commits the
                          version: a blob without a record is a torn write, never served
    <name>/CURRENT        the current version number (replaced atomically)
    _locks/<name>.lock    flock serializing writers of one name (threads and processes)
    _deleted/<name>       highest number a deleted name reached, so numbers are never reused
    _events/              the change feed: GENERATION counter, CHANGES log, LOCK (changelog.py)
    _trash/               delete renames a name's directory here (atomic), then removes it

Names cannot start with "_" or ".", so none of the bookkeeping entries can collide with a name.
Writers take the name lock, then (to announce) the events lock; never the other way round.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prompts_store import fsio
from prompts_store.base import (
    DEFAULT_MAX_BLOB_BYTES,
    ChangeKind,
    Conflict,
    CorruptBlob,
    NotFound,
    PromptStore,
    StoredVersion,
    StoreUnavailable,
    VersionInfo,
    check_data,
    checksum,
    conflict_message,
    encode_meta,
    no_version_message,
    verify,
)
from prompts_store.changelog import ChangeLog, FileEvents
from prompts_store.events import NameState, Watcher
from prompts_store.names import check_name, check_version, is_valid_name

_RECORD = re.compile(r"v([1-9][0-9]*)\.json")
_BLOB = re.compile(r"v([1-9][0-9]*)\.blob")


class FileStore(PromptStore):
    """Checkpoint versions in a local directory; safe for many threads and processes."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
        check_interval: float = 0.05,
        full_resync_interval: float | None = 30.0,
        log_max_bytes: int = 1 << 20,
    ) -> None:
        self.root = Path(root).expanduser().absolute()
        self.max_blob_bytes = max_blob_bytes
        self._check_interval = check_interval
        self._full_resync = full_resync_interval
        self._changes = ChangeLog(self.root / "_events", log_max_bytes)
        # names() as of (change counter, monotonic time): see names()
        self._names: tuple[int, float, tuple[str, ...]] | None = None
        self._watchers: weakref.WeakSet[Watcher] = weakref.WeakSet()
        try:
            for sub in ("_locks", "_deleted", "_events", "_trash"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise fsio.unavailable(exc, f"create the store directory {self.root}") from exc
        # Leftovers of deletes that crashed before removing their trash.
        for entry in (self.root / "_trash").iterdir():
            shutil.rmtree(entry, ignore_errors=True)

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    # -- paths --------------------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        return self.root / name

    def _lock(self, name: str) -> Path:
        return self.root / "_locks" / f"{name}.lock"

    def _tombstone(self, name: str) -> Path:
        return self.root / "_deleted" / name

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
        sha, created_at = checksum(data), time.time()
        with fsio.flocked(self._lock(name)):
            folder = self._dir(name)
            try:
                if not folder.exists():
                    folder.mkdir()
                    fsio.fsync_dir(self.root)  # the new directory entry must outlive a crash too
            except OSError as exc:
                raise fsio.unavailable(exc, f"create {folder}") from exc
            existing = self._scan_and_clean(name)
            version = max([fsio.read_int(self._tombstone(name)) or 0, *existing]) + 1
            record = {
                "name": name,
                "version": version,
                "sha256": sha,
                "size": len(data),
                "created_at": created_at,
                "meta": json.loads(meta_json),
            }
            blob, rec = folder / f"v{version}.blob", folder / f"v{version}.json"
            try:
                fsio.atomic_write(blob, data)  # durable before the record that commits it
                fsio.atomic_write(rec, json.dumps(record).encode())
                if activate:
                    fsio.atomic_write(folder / "CURRENT", f"{version}\n".encode())
            except StoreUnavailable:
                # All or nothing: withdraw the version unless the pointer already reached it
                # (only a failed directory fsync after the rename gets there).
                if fsio.read_int(folder / "CURRENT") != version:
                    fsio.remove_quietly(rec)
                    fsio.remove_quietly(blob)
                raise
            changes: list[tuple[ChangeKind, int | None]] = [("put", version)]
            if activate:
                changes.append(("activate", version))
            # Announced under the name lock so that the log orders one name's changes correctly.
            self._changes.announce(name, changes)
        return version

    def activate(self, name: str, version: int, expected: int | None = None) -> int:
        """Point `name` at `version` (compare-and-set against `expected`; 0 = none current)."""
        name = check_name(name)
        version = check_version(version)
        if expected is not None:
            expected = check_version(expected, allow_zero=True)
        with fsio.flocked(self._lock(name)):
            existing = self._committed(name)
            if not existing:
                raise NotFound(f"no checkpoint named {name!r}")
            if version not in existing:
                raise NotFound(no_version_message(name, version, existing))
            pointer = self._dir(name) / "CURRENT"
            current = fsio.read_int(pointer)
            if expected is not None and (current or 0) != expected:
                raise Conflict(conflict_message(name, expected, current), current)
            if current != version:
                fsio.atomic_write(pointer, f"{version}\n".encode())
                self._changes.announce(name, [("activate", version)])
        return version

    def delete(self, name: str) -> None:
        """Remove every version of `name` and its pointer, atomically (one rename)."""
        name = check_name(name)
        with fsio.flocked(self._lock(name)):
            existing = self._scan_and_clean(name)
            if not existing:
                raise NotFound(f"no checkpoint named {name!r}")
            top = max([fsio.read_int(self._tombstone(name)) or 0, *existing])
            # First remember the highest number, so a crash right after cannot lead to reuse.
            fsio.atomic_write(self._tombstone(name), f"{top}\n".encode(), tag=f"{name}+")
            trash = self.root / "_trash" / f"{name}+{secrets.token_hex(6)}"
            try:
                os.rename(self._dir(name), trash)
                fsio.fsync_dir(self.root)
            except OSError as exc:
                raise fsio.unavailable(exc, f"delete {name!r}") from exc
            self._changes.announce(name, [("delete", None)])
        shutil.rmtree(trash, ignore_errors=True)

    def _scan_and_clean(self, name: str) -> list[int]:
        """Committed versions of `name`; removes torn leftovers. Call with the name lock held."""
        folder = self._dir(name)
        try:
            entries = os.listdir(folder)
        except FileNotFoundError:
            entries = []
        except OSError as exc:
            raise fsio.unavailable(exc, f"list {folder}") from exc
        committed = {int(m[1]) for e in entries if (m := _RECORD.fullmatch(e))}
        for entry in entries:
            blob = _BLOB.fullmatch(entry)
            if entry.startswith(fsio.TMP_PREFIX) or (blob and int(blob[1]) not in committed):
                fsio.remove_quietly(folder / entry)  # a writer died here; nobody else is inside
        with contextlib.suppress(OSError):
            for entry in os.listdir(self.root / "_deleted"):
                if entry.startswith(f"{fsio.TMP_PREFIX}{name}+"):
                    fsio.remove_quietly(self.root / "_deleted" / entry)
        return sorted(committed)

    # -- reads --------------------------------------------------------------------------------

    def get(self, name: str, version: int | None = None) -> StoredVersion:
        """Return a version (the current one if `version` is None), checksum verified."""
        name = check_name(name)
        version = self._current_or_raise(name) if version is None else check_version(version)
        info = self._record(name, version)
        try:
            data = fsio.read_bytes(self._dir(name) / f"v{version}.blob")
        except FileNotFoundError:
            if not (self._dir(name) / f"v{version}.json").exists():
                raise NotFound(no_version_message(name, version, [])) from None  # deleted meanwhile
            raise CorruptBlob(
                f"checkpoint {name!r} version {version} is damaged: its data file is missing; "
                "restore it from a backup or delete and re-upload it"
            ) from None
        verify(name, version, data, info.sha256, info.size)
        return StoredVersion(name, version, data, info.meta, info.sha256, info.created_at)

    def versions(self, name: str) -> list[VersionInfo]:
        """Every stored version of `name`, oldest first, without data."""
        name = check_name(name)
        out = []
        for version in self._committed(name):
            try:
                out.append(self._record(name, version))
            except NotFound:
                continue  # deleted while listing
        if not out:
            raise NotFound(f"no checkpoint named {name!r}")
        return out

    def names(self) -> list[str]:
        """Every name with at least one stored version, sorted.

        Telling a committed name from a first upload in progress takes one directory listing
        per name (0.4 s for 10,000 on tmpfs), so the answer is reused while the store's change
        counter stands: every put and delete (of any process) bumps it after committing. Reused
        for at most the watchers' full-resync interval, as they do, in case a change committed
        but failed to announce itself."""
        generation = self._changes.generation()
        cached, now = self._names, time.monotonic()
        if cached is not None and cached[0] == generation and now - cached[1] < self._names_ttl:
            return list(cached[2])
        try:
            entries = os.listdir(self.root)
        except OSError as exc:
            raise fsio.unavailable(exc, f"list {self.root}") from exc
        names = sorted(e for e in entries if is_valid_name(e) and self._committed(e))
        self._names = (generation, now, tuple(names))
        return names

    @property
    def _names_ttl(self) -> float:
        return self._full_resync if self._full_resync is not None else 30.0

    def current(self, name: str) -> int | None:
        """The current version of `name`, None if none is active; NotFound if no such name."""
        name = check_name(name)
        pointer = fsio.read_int(self._dir(name) / "CURRENT")
        if pointer is None and not self._committed(name):
            raise NotFound(f"no checkpoint named {name!r}")
        return pointer

    def _current_or_raise(self, name: str) -> int:
        pointer = self.current(name)
        if pointer is None:
            raise NotFound(f"checkpoint {name!r} has no current version; activate one first")
        return pointer

    def _committed(self, name: str) -> list[int]:
        try:
            entries = os.listdir(self._dir(name))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise fsio.unavailable(exc, f"list {name!r}") from exc
        return sorted(int(m[1]) for e in entries if (m := _RECORD.fullmatch(e)))

    def _record(self, name: str, version: int) -> VersionInfo:
        try:
            raw = fsio.read_bytes(self._dir(name) / f"v{version}.json")
        except FileNotFoundError:
            raise NotFound(no_version_message(name, version, self._committed(name))) from None
        try:
            rec = json.loads(raw)
            return VersionInfo(
                name=name,
                version=version,
                size=int(rec["size"]),
                sha256=str(rec["sha256"]),
                created_at=float(rec["created_at"]),
                meta=dict(rec["meta"]),
            )
        except (ValueError, KeyError, TypeError):
            raise CorruptBlob(
                f"checkpoint {name!r} version {version} is damaged: its record v{version}.json "
                "is unreadable; restore it from a backup or delete and re-upload it"
            ) from None

    # -- health and events --------------------------------------------------------------------

    def ping(self) -> None:
        """Raise StoreUnavailable unless the directory exists, is writable and has space."""
        try:
            stat = os.statvfs(self.root)
        except OSError as exc:
            raise fsio.unavailable(exc, f"reach {self.root}") from exc
        if not os.access(self.root, os.W_OK):
            raise StoreUnavailable(f"file store {self.root} is not writable")
        if stat.f_bavail == 0:
            raise StoreUnavailable(f"file store {self.root}: the disk is full; free space")

    def watch(self) -> Watcher:
        """Subscribe to changes made after this call (polls the generation counter)."""
        watcher = Watcher(
            FileEvents(self._changes, self.snapshot),
            check_interval=self._check_interval,
            full_resync_interval=self._full_resync,
        )
        self._watchers.add(watcher)
        return watcher

    def close(self) -> None:
        """Close every open subscription (the store holds no other resources)."""
        for watcher in list(self._watchers):
            watcher.close()

    def snapshot(self) -> dict[str, NameState]:
        """Every name's pointer and newest version (what a watcher diffs against)."""
        out = {}
        for name in self.names():
            existing = self._committed(name)
            if existing:
                out[name] = NameState(fsio.read_int(self._dir(name) / "CURRENT"), existing[-1])
        return out
