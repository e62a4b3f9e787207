"""Storage of prompt checkpoint versions: opaque bytes, a current pointer per name, events.

    store = open_store("file://var/store")          # or "redis://127.0.0.1:6379/0"
    v = store.put("eurosat", blob, {"method": "coop"})
    store.get("eurosat").data                        # the current version, checksum verified
    store.activate("eurosat", 1, expected=v)         # rollback, compare-and-set
    for event in store.watch(): ...                  # ChangeEvent(name, kind, version, generation)

This package knows nothing of torch or of the service: it stores bytes.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from prompts_store.base import (
    MAX_META_BYTES,
    ChangeEvent,
    Conflict,
    CorruptBlob,
    InvalidMeta,
    InvalidName,
    NotFound,
    PromptStore,
    StoredVersion,
    StoreError,
    StoreUnavailable,
    Subscription,
    TooLarge,
    VersionInfo,
)
from prompts_store.names import MAX_NAME_LENGTH, check_name

__all__ = [
    "MAX_META_BYTES",
    "MAX_NAME_LENGTH",
    "ChangeEvent",
    "Conflict",
    "CorruptBlob",
    "InvalidMeta",
    "InvalidName",
    "NotFound",
    "PromptStore",
    "StoreError",
    "StoreUnavailable",
    "StoredVersion",
    "Subscription",
    "TooLarge",
    "VersionInfo",
    "check_name",
    "open_store",
]


def open_store(url: str, **options: Any) -> PromptStore:
    """Open the store at `url`: `file://DIR` (relative or absolute) or `redis://HOST:PORT/DB`.

    A redis URL may carry `?prefix=NAME` (key prefix, default "ps") next to redis-py's own query
    options; `options` go to the backend's constructor (e.g. max_blob_bytes).
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme == "file" and sep:
        if not rest:
            raise ValueError("file:// store URL needs a directory, e.g. file://var/store")
        from prompts_store.filesystem import FileStore

        return FileStore(rest, **options)
    if scheme in ("redis", "rediss", "unix") and sep:
        from prompts_store.redis import RedisStore

        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        for key, value in query:
            if key == "prefix":
                options.setdefault("prefix", value)
        kept = urlencode([(k, v) for k, v in query if k != "prefix"])
        return RedisStore(urlunsplit(parts._replace(query=kept)), **options)
    raise ValueError(f"unsupported store URL {url!r}: use file://DIR or redis://HOST:PORT/DB")
