"""The control block: a few numbers every process of one service shares, in shared memory.

With several front-end processes, admission must see the work all of them have admitted, and
each front end must know whether the engine is up. A 4 KiB segment holds:
- the engine's pid, its generation (bumped by every (re)start) and a ready flag;
- the engine's measured compute seconds per request (what admission multiplies);
- per front end, the requests it has admitted and not yet answered.
Each field has ONE writer (the engine its fields, front end i its counter), so no lock is
needed: aligned 8-byte stores are atomic on the machines we run on, and a reader that sees a
value one update old decides as it would have a moment earlier.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from pathlib import Path

from service.engine.shm import SHM_DIR, map_segment

MAX_FRONTENDS = 256
_HEADER = struct.Struct("<qqqd")  # engine pid, generation, ready, seconds per request
_SIZE = _HEADER.size + 8 * MAX_FRONTENDS


class ControlBlock:
    """One service's shared numbers; `create` (the supervisor) or `attach` (its children)."""

    def __init__(self, path: Path, mapping: mmap.mmap, owner: bool) -> None:
        self.path, self._map, self._owner = path, mapping, owner

    @classmethod
    def create(cls, name: str, directory: Path = SHM_DIR) -> ControlBlock:
        path = directory / name
        return cls(path, map_segment(path, _SIZE, create=True), owner=True)

    @classmethod
    def attach(cls, name: str, directory: Path = SHM_DIR) -> ControlBlock:
        path = directory / name
        return cls(path, map_segment(path, _SIZE, create=False), owner=False)

    # --- the engine's fields ---------------------------------------------------------------
    def engine(self) -> tuple[int, int, bool, float]:
        """(pid, generation, ready, seconds per request) as last written by the engine."""
        pid, generation, ready, per = _HEADER.unpack_from(self._map, 0)
        return pid, generation, bool(ready), per

    def set_engine(self, pid: int, generation: int, ready: bool, per_request: float = 0.0) -> None:
        _HEADER.pack_into(self._map, 0, pid, generation, int(ready), per_request)

    def set_seconds_per_request(self, value: float) -> None:
        struct.pack_into("<d", self._map, 24, value)

    # --- the front ends' admission counters ---------------------------------------------------
    def set_admitted(self, frontend: int, count: int) -> None:
        struct.pack_into("<q", self._map, _HEADER.size + 8 * frontend, count)

    def admitted(self) -> int:
        """Requests admitted and not yet answered, summed over every front end."""
        counts = struct.unpack_from(f"<{MAX_FRONTENDS}q", self._map, _HEADER.size)
        return int(sum(counts))

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self._map.close()
        if self._owner:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
