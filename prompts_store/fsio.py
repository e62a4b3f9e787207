"""Durable file primitives for the file store: atomic replace, directory fsync, flock.

Every helper turns OSError into StoreUnavailable (disk full, permissions, I/O errors), so that the
service answers 503 instead of crashing, and removes its own temp file on the way out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from prompts_store.base import StoreUnavailable

TMP_PREFIX = ".tmp-"


def unavailable(exc: OSError, doing: str) -> StoreUnavailable:
    """A StoreUnavailable whose message says what failed and what a user can do."""
    hint = {
        errno.ENOSPC: "the disk is full; free space",
        errno.EDQUOT: "the disk quota is exhausted; free space",
        errno.EACCES: "permission denied; check the store directory's owner and mode",
        errno.EPERM: "permission denied; check the store directory's owner and mode",
        errno.EROFS: "the file system is read-only",
    }.get(exc.errno or 0, "an I/O error occurred; check the disk")
    return StoreUnavailable(f"file store cannot {doing}: {hint} ({exc})")


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` to `fd` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    """Make renames and unlinks in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, tag: str = "", sync_dir: bool = True) -> None:
    """Replace `path` by `data` so a crash leaves either the old or the new file, never a mix.

    The temp file lives in the same directory (rename is only atomic within one file system);
    its name starts with TMP_PREFIX + `tag` so that cleanup under the right lock can find it.
    """
    tmp = path.parent / f"{TMP_PREFIX}{tag}{secrets.token_hex(6)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if sync_dir:
            fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise unavailable(exc, f"write {path.name}") from exc


def read_bytes(path: Path) -> bytes:
    """Read a whole file (FileNotFoundError passes through; other OSErrors -> unavailable)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise unavailable(exc, f"read {path.name}") from exc


def read_int(path: Path) -> int | None:
    """Read a small integer file; None if it is missing or not an integer."""
    try:
        text = read_bytes(path)
    except FileNotFoundError:
        return None
    try:
        return int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None


@contextlib.contextmanager
def flocked(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold an flock on `path` (created if missing). It excludes threads and processes alike,
    because each call opens its own file description. Lock files are never deleted: deleting
    one while another process waits on it would let two writers in at once.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise unavailable(exc, f"open lock {path.name}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def remove_quietly(path: Path) -> None:
    """Unlink `path`, ignoring a missing file or a failure (used for cleanup only)."""
    with contextlib.suppress(OSError):
        os.unlink(path)
