"""The embedded store's job runner: a child process trains, the service keeps the books.

One runner serves the module: its child loads the tiny backbone (from a weights file, so the
checkpoints it publishes are valid for this process's backbone) and is killed once on purpose.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from prompts_store import open_store
from service import checkpoints, errors
from service.settings import Settings
from service.training.local_jobs import LocalJobs
from service.training.runs import TrainSpec
from tests.conftest import TINY_CONFIG
from tests.procs import colour_items, save_weights


def spec(name: str, epochs: int) -> TrainSpec:
    return TrainSpec.model_validate(
        {
            "name": name,
            "method": "coop",
            "method_config": {"n_ctx": 4},
            "dataset": {"kind": "upload", "images": colour_items(4)},
            "recipe": {"epochs": epochs, "batch_size": 4, "warmup_epochs": 0, "lr": 0.05},
        }
    )


def wait(
    jobs: LocalJobs, job_id: str, done: Callable[[dict[str, Any]], bool], timeout: float = 90
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not done(status := jobs.status(job_id)):
        assert time.monotonic() < deadline, f"gave up waiting; last status {status}"
        time.sleep(0.05)
    return status


@pytest.fixture(scope="module")
def runner(backbone, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalJobs, Path]]:
    base = tmp_path_factory.mktemp("local-jobs")
    weights = save_weights(backbone, base / "tiny.safetensors")
    settings = Settings(
        model="", model_config_path=str(TINY_CONFIG), pretrained=str(weights),
        store=f"file://{base / 'store'}",
    )  # fmt: skip
    jobs = LocalJobs(settings, out_dir=base / "runs")
    yield jobs, base / "store"
    jobs.close()


def test_a_job_runs_reports_progress_and_publishes(runner, backbone):
    jobs, store_dir = runner
    job_id = jobs.submit(spec("first", epochs=3))
    assert jobs.status(job_id)["state"] in ("queued", "started")
    out = wait(jobs, job_id, lambda s: s["state"] not in ("queued", "started"))
    assert out["state"] == "finished", out
    assert out["progress"]["epoch"] == 3 and out["result"]["version"] == 1
    # the curve a console draws: at least one point per epoch, in order, ending at the last one
    epochs = [p["epoch"] for p in out["history"]]
    assert len(epochs) >= 3 and epochs == sorted(epochs) and epochs[-1] == 3
    assert out["history"][-1]["loss"] == out["progress"]["loss"]
    store = open_store(f"file://{store_dir}")
    assert checkpoints.load(store.get("first").data, backbone).manifest.method == "coop"
    with pytest.raises(errors.Conflict):
        jobs.cancel(job_id)


def test_queued_jobs_wait_their_turn_and_cancel_at_once(runner):
    jobs, store_dir = runner
    long = jobs.submit(spec("long", epochs=500))
    queued = jobs.submit(spec("never", epochs=1))
    wait(jobs, long, lambda s: "progress" in s)
    assert jobs.status(queued)["state"] == "queued"  # one job at a time
    assert jobs.cancel(queued)["state"] == "cancelled"
    asked = jobs.cancel(long)
    assert asked["state"] == "started" and asked["cancel_requested"] is True
    out = wait(jobs, long, lambda s: s["state"] != "started")
    assert out["state"] == "cancelled" and out["progress"]["epoch"] < 500
    names = open_store(f"file://{store_dir}").names()
    assert "long" not in names and "never" not in names


def test_a_killed_child_fails_its_job_and_the_next_job_gets_a_new_one(runner):
    jobs, store_dir = runner
    job_id = jobs.submit(spec("killed", epochs=500))
    wait(jobs, job_id, lambda s: "progress" in s)
    os.kill(jobs._child.pid, signal.SIGKILL)
    out = wait(jobs, job_id, lambda s: s["state"] != "started", timeout=10)
    assert out["state"] == "failed" and out["error"]["code"] == "worker_lost", out
    assert "killed" not in open_store(f"file://{store_dir}").names()
    after = jobs.submit(spec("after", epochs=1))
    assert wait(jobs, after, lambda s: s["state"] not in ("queued", "started"))["state"] == (
        "finished"
    )


def test_unknown_ids_and_bad_specs(runner):
    jobs, _ = runner
    with pytest.raises(errors.NotFound):
        jobs.status("nope")
    bad = spec("bad", epochs=1).model_dump()
    bad["recipe"]["surprise"] = 1
    with pytest.raises(errors.InvalidContent, match="surprise"):
        jobs.submit(TrainSpec.model_validate(bad))
