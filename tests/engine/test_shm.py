"""Shared-memory image slots: what a front end writes, the engine reads, in another process;
full pools refuse at once; a dead service's segments are removed at the next start."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys

import pytest
import torch

from service import errors
from service.engine.shm import SlotPool, SlotReader, remove_stale, segment_name

SHAPE = (4, 5, 3)


def images(n: int, seed: int = 0) -> torch.Tensor:
    # float32 slots hold the preprocessed images; any float values round-trip bit for bit
    return torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def _read_in_child(name: str, count: int, slots: list[int], directory: str, out) -> None:
    from pathlib import Path

    reader = SlotReader(name, count, SHAPE, Path(directory))
    out.send(reader.read(slots).tolist())
    reader.close()


def test_slots_written_here_are_read_by_another_process(tmp_path):
    pool = SlotPool(segment_name(os.getpid(), "fe0"), 8, SHAPE, tmp_path)
    try:
        batch = images(3)
        slots = pool.put(batch)
        assert len(set(slots)) == 3 and pool.free == 5
        parent, child = mp.get_context("spawn").Pipe()
        proc = mp.get_context("spawn").Process(
            target=_read_in_child, args=(pool.name, 8, slots, str(tmp_path), child)
        )
        proc.start()
        got = torch.tensor(parent.recv(), dtype=torch.float32)
        proc.join(30)
        assert torch.equal(got, batch)
    finally:
        pool.close()
    assert not (tmp_path / pool.name).exists()


def test_a_full_pool_refuses_at_once_and_released_slots_are_reused(tmp_path):
    pool = SlotPool("promptserve-1-x", 4, SHAPE, tmp_path)
    try:
        first = pool.put(images(3))
        with pytest.raises(errors.Overloaded):
            pool.put(images(2))
        assert pool.free == 1  # nothing taken by the refused request
        pool.release(first)
        again = pool.put(images(4, seed=1))
        assert sorted(again) == [0, 1, 2, 3]
        reader = SlotReader(pool.name, 4, SHAPE, tmp_path)
        assert torch.equal(reader.read(again), images(4, seed=1))
        with pytest.raises(ValueError):
            reader.read([4])
        reader.close()
    finally:
        pool.close()


def test_wrong_shapes_are_refused(tmp_path):
    pool = SlotPool("promptserve-1-y", 2, SHAPE, tmp_path)
    try:
        with pytest.raises(ValueError):
            pool.put(torch.zeros(1, 4, 4, 3))
        with pytest.raises(ValueError):
            pool.put(torch.zeros(1, *SHAPE, dtype=torch.float64))
    finally:
        pool.close()


def test_a_dead_services_segments_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(dead.stdout)
    (tmp_path / segment_name(dead_pid, "fe0")).write_bytes(b"x")
    (tmp_path / segment_name(dead_pid, "control")).write_bytes(b"x")
    live = tmp_path / segment_name(os.getpid(), "fe0")
    live.write_bytes(b"x")
    (tmp_path / "someone-else").write_bytes(b"x")
    removed = remove_stale(tmp_path)
    assert sorted(removed) == sorted(
        [segment_name(dead_pid, "fe0"), segment_name(dead_pid, "control")]
    )
    assert live.exists() and (tmp_path / "someone-else").exists()
