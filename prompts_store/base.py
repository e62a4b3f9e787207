"""The store contract: errors, records and the `PromptStore` protocol every backend implements.

A store keeps immutable, numbered versions of opaque checkpoint bytes per name, plus a movable
`current` pointer per name. It knows nothing about what the bytes mean.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

#: Serialized metadata (compact JSON) may not exceed this many bytes.
MAX_META_BYTES = 64 * 1024
#: Default bound on one version's bytes; checkpoints are small, and Redis strings stop at 512 MiB.
DEFAULT_MAX_BLOB_BYTES = 320 * 1024 * 1024  # a checkpoint with a 7B output head in bf16 fits

ChangeKind = Literal["put", "activate", "delete"]


class StoreError(Exception):
    """Base class of every error the store raises."""


class InvalidName(StoreError, ValueError):
    """A checkpoint name (or version number) does not match the allowed pattern."""


class InvalidMeta(StoreError, ValueError):
    """Metadata is not a JSON object with string keys and JSON values."""


class TooLarge(StoreError, ValueError):
    """Data or metadata exceeds the store's size bounds."""


class NotFound(StoreError, LookupError):
    """The name, or the requested version of it, does not exist."""


class Conflict(StoreError):
    """A compare-and-set lost: the current pointer was not the expected version."""

    def __init__(self, message: str, current: int | None) -> None:
        super().__init__(message)
        #: The pointer's actual value when the compare failed (None: no version current).
        self.current = current


class CorruptBlob(StoreError):
    """Stored bytes do not match their recorded SHA-256: the copy at rest is damaged."""


class StoreUnavailable(StoreError):
    """The backend cannot serve the request now (down, disk full, I/O error); retry later."""


@dataclass(frozen=True)
class VersionInfo:
    """One stored version, without its bytes."""

    name: str
    version: int
    size: int
    sha256: str
    created_at: float  # seconds since the epoch (UTC)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredVersion:
    """One stored version with its bytes, already checked against `sha256`."""

    name: str
    version: int
    data: bytes
    meta: dict[str, Any]
    sha256: str
    created_at: float

    @property
    def size(self) -> int:
        """Length of `data` in bytes."""
        return len(self.data)


@dataclass(frozen=True)
class ChangeEvent:
    """A change to the store: a version was put, a pointer moved, or a name was deleted.

    `generation` is the store-wide change counter at that change; events of one subscription come
    in increasing generation order. `version` is None for "delete".
    """

    name: str
    kind: ChangeKind
    version: int | None
    generation: int


@runtime_checkable
class Subscription(Protocol):
    """A stream of ChangeEvents; iterate it (blocks) or poll it with `next(timeout)`."""

    def next(self, timeout: float | None = None) -> ChangeEvent | None:
        """Return the next event, or None when `timeout` seconds pass (or it is closed)."""
        ...

    def __iter__(self) -> Iterator[ChangeEvent]: ...

    def close(self) -> None:
        """Stop watching and release connections; safe to call twice and from another thread."""
        ...


@runtime_checkable
class PromptStore(Protocol):
    """Immutable checkpoint versions per name, a compare-and-set `current` pointer, and events.

    Every method may raise StoreUnavailable; names are checked first and raise InvalidName.
    """

    def put(
        self,
        name: str,
        data: bytes,
        meta: Mapping[str, Any] | None = None,
        activate: bool = True,
    ) -> int:
        """Store a new version and return its number (1, 2, ...); make it current if `activate`."""
        ...

    def get(self, name: str, version: int | None = None) -> StoredVersion:
        """Return a version (the current one when `version` is None), checksum verified."""
        ...

    def versions(self, name: str) -> list[VersionInfo]:
        """Every stored version of `name`, oldest first, without data."""
        ...

    def names(self) -> list[str]:
        """Every name with at least one stored version, sorted."""
        ...

    def current(self, name: str) -> int | None:
        """The current version of `name`, or None if none was activated (NotFound: no name)."""
        ...

    def activate(self, name: str, version: int, expected: int | None = None) -> int:
        """Point `name` at `version` and return it; with `expected`, only if the pointer equals it.

        `expected=0` means "no version is current yet". A lost compare raises Conflict.
        """
        ...

    def delete(self, name: str) -> None:
        """Remove every version of `name` and its pointer. Numbers are never reused afterwards."""
        ...

    def watch(self) -> Subscription:
        """Subscribe to changes made after this call (raises StoreUnavailable if down now)."""
        ...

    def ping(self) -> None:
        """Raise StoreUnavailable unless the backend can serve reads and writes."""
        ...

    def close(self) -> None:
        """Release connections and close open subscriptions."""
        ...


def checksum(data: bytes) -> str:
    """SHA-256 of `data` as lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def verify(name: str, version: int, data: bytes, sha256: str, size: int | None = None) -> None:
    """Raise CorruptBlob unless `data` has the recorded length and SHA-256."""
    if size is not None and len(data) != size:
        raise CorruptBlob(
            f"checkpoint {name!r} version {version} is damaged: {len(data)} bytes stored, "
            f"{size} recorded; restore it from a backup or delete and re-upload it"
        )
    if checksum(data) != sha256:
        raise CorruptBlob(
            f"checkpoint {name!r} version {version} is damaged: its SHA-256 does not match the "
            "recorded one; restore it from a backup or delete and re-upload it"
        )


def encode_meta(meta: Mapping[str, Any] | None) -> str:
    """Validate metadata and return it as compact JSON (InvalidMeta / TooLarge otherwise)."""
    if meta is None:
        return "{}"
    if not isinstance(meta, Mapping) or not all(isinstance(k, str) for k in meta):
        raise InvalidMeta("metadata must be a mapping with string keys")
    try:
        text = json.dumps(dict(meta), separators=(",", ":"), allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvalidMeta(f"metadata must be JSON-serializable (no NaN/inf): {exc}") from None
    if len(text.encode()) > MAX_META_BYTES:
        raise TooLarge(
            f"metadata is {len(text.encode())} bytes as JSON; the limit is {MAX_META_BYTES}"
        )
    return text


def check_data(data: bytes, max_bytes: int) -> bytes:
    """Return `data` as bytes, or raise TooLarge / TypeError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"checkpoint data must be bytes, not {type(data).__name__}")
    if type(data) is not bytes:
        data = bytes(data)  # copies; plain bytes (the usual case) are used as they are
    if len(data) > max_bytes:
        raise TooLarge(f"checkpoint is {len(data)} bytes; this store accepts at most {max_bytes}")
    return data


def no_version_message(name: str, version: int, existing: list[int]) -> str:
    """Message for a missing version, listing the versions that exist."""
    have = f"; it has versions {_ranges(existing)}" if existing else ""
    return f"checkpoint {name!r} has no version {version}{have}"


def conflict_message(name: str, expected: int, current: int | None) -> str:
    """Message for a lost compare-and-set."""
    now = "no version" if current is None else f"version {current}"
    want = "no version" if expected == 0 else f"version {expected}"
    return (
        f"checkpoint {name!r}: expected {want} to be current but {now} is; "
        "someone else changed it, re-read and retry"
    )


def _ranges(values: list[int]) -> str:
    """'1-3, 5' for [1, 2, 3, 5]: short messages even for long histories."""
    parts: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)
