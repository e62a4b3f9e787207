"""Shared-memory image slots between a front-end process and the engine process.

A front end owns one segment, a file under /dev/shm mapped by both processes: `count` slots of
one model-sized image each: the `3 x H x W` uint8 crop the preprocessing makes before its
float conversion (a quarter of float32's bytes: copying a float32 224x224 image cost the engine
~0.1 ms of CPU, bench/frontend.py). The engine normalizes where the model runs.
It writes a request's images into free slots and sends the engine only the slot numbers
(a few bytes); the engine maps the segment once and reads the slots it is told
of, so no image crosses a socket. Only the front end allocates and frees: a slot is freed when
the engine's answer for its request arrives (the engine has copied the images into its batch
before it answers), or when the engine is known dead.

Segments are named `<prefix>-<service pid>-...`, so whoever starts the service next can tell a
dead service's segments (its pid is gone) and remove them (`remove_stale`): a segment never
outlives its service for longer than the next start, even after `kill -9`.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from service.errors import Overloaded

SHM_DIR = Path("/dev/shm")
PREFIX = "promptserve"
_NAME = re.compile(rf"^{PREFIX}-(\d+)-")


def segment_name(service_pid: int, role: str) -> str:
    """The file name of a segment of the service whose supervisor is `service_pid`."""
    return f"{PREFIX}-{service_pid}-{role}"


def remove_stale(directory: Path = SHM_DIR) -> list[str]:
    """Remove the segments of services whose supervisor process no longer exists."""
    removed = []
    for path in directory.glob(f"{PREFIX}-*"):
        match = _NAME.match(path.name)
        if match is None or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir():  # the metrics files of prometheus-client's multiprocess mode
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def map_segment(path: Path, size: int, create: bool) -> mmap.mmap:
    """A shared mapping of the file `path`: created (never an existing one: O_EXCL, owner only)
    and sized, or opened as it is."""
    flags = os.O_CREAT | os.O_EXCL | os.O_RDWR if create else os.O_RDWR
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


class SlotPool:
    """The front end's side: a segment of `count` image slots, a free list, writes."""

    def __init__(
        self,
        name: str,
        count: int,
        shape: Sequence[int],
        directory: Path = SHM_DIR,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.name, self.count, self.shape, self.dtype = name, count, tuple(shape), dtype
        self.slot_bytes = int(torch.Size(self.shape).numel()) * dtype.itemsize
        self.path = directory / name
        self._map = map_segment(self.path, self.slot_bytes * count, create=True)
        self._tensor = torch.frombuffer(self._map, dtype=dtype).view(count, *self.shape)
        self._free = list(range(count - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    def put(self, images: Tensor) -> list[int]:
        """Copy `[n, *shape]` images into free slots; their numbers (Overloaded if full)."""
        n = int(images.shape[0])
        if tuple(images.shape[1:]) != self.shape or images.dtype != self.dtype:
            raise ValueError(
                f"slots hold {self.shape} {self.dtype}, "
                f"not {tuple(images.shape[1:])} {images.dtype}"
            )
        if n > len(self._free):
            raise Overloaded(
                f"image slots full ({self.count - len(self._free)} of {self.count} in use); "
                "retry with backoff"
            )
        slots = [self._free.pop() for _ in range(n)]
        for i, slot in enumerate(slots):
            self._tensor[slot].copy_(images[i])
        return slots

    def release(self, slots: Sequence[int]) -> None:
        """Give slots back (their request was answered, or will never be)."""
        self._free.extend(slots)

    def close(self) -> None:
        """Unmap and remove the segment (the engine's mapping stays valid until it unmaps)."""
        del self._tensor
        with contextlib.suppress(BufferError):
            self._map.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class SlotReader:
    """The engine's side: one segment mapped, slots gathered into a batch."""

    def __init__(
        self,
        name: str,
        count: int,
        shape: Sequence[int],
        directory: Path = SHM_DIR,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.name, self.count, self.shape = name, count, tuple(shape)
        size = int(torch.Size(self.shape).numel()) * dtype.itemsize * count
        # Mapped shared and writable (torch views of read-only memory warn on creation); the
        # engine only ever reads it.
        self._map = map_segment(directory / name, size, create=False)
        self._tensor = torch.frombuffer(self._map, dtype=dtype).view(count, *self.shape)

    def read(self, slots: Sequence[int]) -> Tensor:
        """A copy of the images in `slots`, `[n, *shape]` (the front end may reuse the
        slots as soon as the engine has answered)."""
        index = list(slots)
        if index and (min(index) < 0 or max(index) >= self.count):
            raise ValueError(f"slot numbers out of range 0..{self.count - 1}")
        # numpy's copy, not torch's: torch parallelizes a large copy over OpenMP threads that
        # then spin-wait for more work, which cost ~3 ms of CPU per request at a few hundred
        # requests/s (bench/frontend.py's engine column) for a 0.03 ms copy.
        return torch.from_numpy(self._tensor.numpy()[index])

    def close(self) -> None:
        del self._tensor
        with contextlib.suppress(BufferError):
            self._map.close()
