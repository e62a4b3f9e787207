"""The control block: what one process writes, another reads; admission sums every front end."""

from __future__ import annotations

import multiprocessing as mp

from service.engine.control import ControlBlock


def _child(name: str, directory: str) -> None:
    from pathlib import Path

    block = ControlBlock.attach(name, Path(directory))
    block.set_admitted(3, 5)
    block.set_engine(pid=4242, generation=2, ready=True, per_request=0.25)
    block.close()


def test_fields_cross_processes_and_admitted_work_is_summed(tmp_path):
    block = ControlBlock.create("promptserve-1-control", tmp_path)
    try:
        block.set_admitted(0, 2)
        proc = mp.get_context("spawn").Process(target=_child, args=(block.path.name, str(tmp_path)))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
        assert block.admitted() == 7  # 2 here + 5 written by the other process
        assert block.engine() == (4242, 2, True, 0.25)
        block.set_seconds_per_request(0.5)
        assert block.engine()[3] == 0.5
    finally:
        block.close()
    assert not block.path.exists()  # the creator removes it
