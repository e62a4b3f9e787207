"""M²PT as a training job: refused early when it cannot run, trained by a worker (RQ) and by the
service's own child process (the embedded store), published like every other checkpoint."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from prompts_store import open_store
from service import checkpoints, errors
from service.settings import Settings
from service.training.datasets import load_data
from service.training.jobs import JobContext, JobQueue, check_spec, run_worker, set_context
from service.training.local_jobs import LocalJobs
from service.training.runs import TrainSpec
from tests.llava.test_training import conversations


def spec(split_file: Path, **extra: object) -> TrainSpec:
    return TrainSpec.model_validate(
        {
            "name": "colours",
            "method": "m2pt",
            "dataset": {"kind": "llava_json", "split_file": str(split_file)},
            "method_config": {"n_visual": 2, "n_text": 2},
            "recipe": {"epochs": 2, "batch_size": 4},
            **extra,
        }
    )


def test_what_cannot_train_is_refused_before_queueing(tmp_path):
    good = spec(tmp_path / "train.json")
    check_spec(good)  # no file access yet: the worker's machine is the one that sees the data
    bad_kind = {**good.model_dump(), "dataset": {"kind": "upload"}}
    with pytest.raises(errors.InvalidContent, match="llava_json"):
        check_spec(TrainSpec.model_validate(bad_kind))
    with pytest.raises(errors.InvalidConfig):
        check_spec(spec(tmp_path / "t.json", method_config={"n_visual": -1}))
    with pytest.raises(errors.InvalidContent, match="recipe"):
        check_spec(spec(tmp_path / "t.json", recipe={"surprise": 1}))


def test_a_worker_trains_an_m2pt_job_and_publishes_it(redis_url, llava, tmp_path):
    store = open_store(f"file://{tmp_path / 'store'}")
    set_context(lambda: JobContext(llava, store, load_data))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        jobs = JobQueue(redis_url, name="t-m2pt")
        job_id = jobs.submit(spec(conversations(tmp_path)))
        run_worker(redis_url, name="t-m2pt", burst=True, preload=False)
        out = jobs.status(job_id)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        set_context(None)
    assert out["state"] == "finished", out
    assert out["result"]["version"] == 1 and "final_loss" in out["result"]["metrics"]
    assert checkpoints.load(store.get("colours").data, llava).manifest.method == "m2pt"


def test_the_embedded_store_trains_m2pt_in_its_child_process(llava_dir, llava, tmp_path):
    settings = Settings(
        backbone="llava", model="tiny-llava", pretrained=str(llava_dir),
        store=f"file://{tmp_path / 'store'}",
    )  # fmt: skip
    jobs = LocalJobs(settings)
    try:
        job_id = jobs.submit(spec(conversations(tmp_path)))
        deadline = time.monotonic() + 120
        while (out := jobs.status(job_id))["state"] in ("queued", "started"):
            assert time.monotonic() < deadline, out
            time.sleep(0.1)
    finally:
        jobs.close()
    assert out["state"] == "finished", out
    blob = open_store(f"file://{tmp_path / 'store'}").get("colours").data
    assert checkpoints.load(blob, llava).manifest.method == "m2pt"  # same weights, same fingerprint


def test_a_llava_server_on_the_file_store_runs_jobs_itself(llava, tmp_path):
    from fastapi.testclient import TestClient

    from service.app import create_app

    settings = Settings(backbone="llava", store=f"file://{tmp_path / 'store'}")
    with TestClient(create_app(settings, backbone=llava)) as client:
        assert isinstance(client.app.state.jobs, LocalJobs)
        r = client.post("/v1/jobs", json=spec(tmp_path / "train.json").model_dump())
        assert r.status_code == 202, r.text  # queued; its child would load the LLaVA
        assert client.delete(f"/v1/jobs/{r.json()['id']}").status_code in (200, 202)
