"""The Redis connection of the job queue: which URL, a client for RQ, Redis failures as 503."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

from service import errors


def queue_url_for(queue: str | None, store: str) -> str | None:
    """The Redis URL jobs use: `queue` if set, else the store's URL when the store is Redis."""
    if queue:
        return queue
    return store if store.split("://")[0].lower() in ("redis", "rediss", "unix") else None


def connect(url: str) -> redis.Redis:
    """A Redis client for RQ (bytes, not decoded); drops the store's own `prefix` option."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "prefix"]
    clean = urlunsplit(parts._replace(query=urlencode(query)))
    return redis.Redis.from_url(clean, socket_connect_timeout=2, socket_timeout=10)


@contextmanager
def redis_errors(conn: redis.Redis) -> Iterator[None]:
    """Redis failures as the one table's 503, naming the server but never its password."""
    try:
        yield
    except redis.RedisError as exc:
        kw = conn.connection_pool.connection_kwargs
        where = f"{kw.get('host', kw.get('path', '?'))}:{kw.get('port', '')}"
        raise errors.StoreUnavailable(f"job queue unavailable (Redis at {where}): {exc}") from exc
