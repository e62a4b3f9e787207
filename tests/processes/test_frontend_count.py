"""How many front ends `--frontends` gives, and the settings it refuses with a clear error."""

from __future__ import annotations

import os

from service import split
from service.settings import Settings


def test_auto_is_one_process_on_a_cpu_device_and_with_in_service_jobs():
    assert split.frontend_count(Settings(device="cpu"))[0] == 1
    gpu = Settings(device="cuda:0", queue="redis://127.0.0.1:1/0")
    cores = len(os.sched_getaffinity(0))
    assert split.frontend_count(gpu)[0] == max(1, min(12, cores - split.ENGINE_CORES))
    assert split.frontend_count(Settings(device="cuda:0", local_jobs=True))[0] == 1
    assert split.frontend_count(Settings(device="cuda:0", backbone="llava"))[0] == 1
    assert split.frontend_count(Settings(frontends=3))[0] == 3


def test_settings_that_need_one_process_are_refused_with_the_fix():
    assert split.check(Settings(frontends=2, local_jobs=False), 2) is None
    assert "PROMPTSERVE_QUEUE" in (split.check(Settings(frontends=2, local_jobs=True), 2) or "")
    assert "--frontends 1" in (split.check(Settings(backbone="llava", local_jobs=False), 2) or "")
    assert split.check(Settings(backbone="llava"), 1) is None


def test_the_cli_refuses_before_starting_anything(capsys):
    from service.cli import main

    code = main(["serve", "--frontends", "2", "--pretrained", "none"])
    assert code == 2
    assert "error (frontends)" in capsys.readouterr().err
