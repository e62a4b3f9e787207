"""Training jobs on a real Redis with real RQ workers: in-process (burst) for the quick cases, a
worker subprocess for progress, cancelling a running job and a worker killed mid-training."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now

from prompts_store import open_store
from service import checkpoints, errors
from service.api.errors import install
from service.api.jobs import router
from service.backbones.clip import load_clip
from service.metrics import Metrics
from service.settings import Settings
from service.training.jobs import JobContext, JobQueue, alive_key, run_worker, set_context
from service.training.runs import EvalSet, RunData, TrainSpec
from service.training.trainer import tensor_batches
from tests.conftest import CLASSNAMES, TINY_CONFIG
from tests.redis_server import RedisServer, _start_server

ROOT = Path(__file__).resolve().parents[2]
TTL = 1.5  # heartbeat TTL the tests submit with: a lost worker shows within ~2 s
ADMIN, READ = "admin-key-jobs", "read-key-jobs"


def spec(name: str = "jobs-demo", epochs: int = 2) -> TrainSpec:
    return TrainSpec.model_validate(
        {
            "name": name,
            "method": "coop",
            "method_config": {"n_ctx": 4},
            "dataset": {"kind": "image_folder", "root": "unused-by-the-fake-loader"},
            "recipe": {"epochs": epochs, "batch_size": 4, "warmup_epochs": 0, "lr": 0.05},
        }
    )


def fake_load_data(delay: float = 0.0, calls: list[str] | None = None) -> Any:
    """8 random images of 4 classes; `delay` seconds per batch makes a run slow enough to watch."""

    def load(spec: TrainSpec, backbone: Any, batch_size: int) -> RunData:
        if calls is not None:
            calls.append(spec.name)
        images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        labels = torch.arange(8) % 4
        inner = tensor_batches(images, labels, batch_size)

        def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for batch in inner(epoch):
                time.sleep(delay)
                yield batch

        evals = {"all": EvalSet(list(CLASSNAMES), lambda: [(images, labels)])}
        return RunData(list(CLASSNAMES), batches, evals, {"kind": "fake"})

    return load


def worker_main(url: str, queue: str, store_dir: str, delay: str) -> None:
    """A worker subprocess: the conftest's tiny backbone (seed 0: the same fingerprint in every
    process), a file store, the fake data, and the real `run_worker`."""
    logging.basicConfig(level=logging.INFO)
    torch.manual_seed(0)
    backbone = load_clip("", "none", model_config=TINY_CONFIG)
    store = open_store(f"file://{store_dir}")
    set_context(lambda: JobContext(backbone, store, fake_load_data(float(delay))))
    run_worker(url, name=queue)


def start_worker(url: str, queue: str, store_dir: Path, delay: float) -> subprocess.Popen[bytes]:
    code = (
        "import sys; from tests.training.test_jobs import worker_main; worker_main(*sys.argv[1:])"
    )
    log = (store_dir.parent / f"worker-{queue}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-c", code, url, queue, str(store_dir), str(delay)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def poll(
    jobs: JobQueue, job_id: str, done: Callable[[dict[str, Any]], bool], timeout: float = 60.0
) -> list[dict[str, Any]]:
    """Every status read until `done` holds (the last one) or the timeout fails the test."""
    seen = [jobs.status(job_id)]
    deadline = time.monotonic() + timeout
    while not done(seen[-1]):
        assert time.monotonic() < deadline, f"gave up waiting; last status {seen[-1]}"
        time.sleep(0.05)
        seen.append(jobs.status(job_id))
    return seen


def rq_job(jobs: JobQueue, job_id: str) -> Job:
    return Job.fetch(job_id, connection=jobs.conn, serializer=JSONSerializer)


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One Redis and two worker subprocesses (booted together): one to watch, one to kill."""
    base = tmp_path_factory.mktemp("jobs")
    (base / "redis").mkdir()
    server = _start_server(base / "redis")
    store_dir = base / "store"
    procs = {q: start_worker(server.url, q, store_dir, 0.1) for q in ("t-live", "t-kill")}
    yield {"url": server.url, "store_dir": store_dir, "procs": procs}
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    server.kill()


@pytest.fixture
def in_process(backbone, tmp_path) -> Iterator[tuple[Any, list[str]]]:
    """The worker context of this process, for burst workers run in the test itself."""
    store = open_store(f"file://{tmp_path / 'store'}")
    calls: list[str] = []
    set_context(lambda: JobContext(backbone, store, fake_load_data(calls=calls)))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield store, calls
    for s, h in handlers.items():  # RQ's work() installs its own
        signal.signal(s, h)
    set_context(None)
    store.close()


def burst(url: str, queue: str) -> None:
    run_worker(url, name=queue, burst=True, preload=False)


# --- in-process workers --------------------------------------------------------------------------


def test_submit_runs_and_publishes(redis_url, in_process, backbone):
    store, calls = in_process
    jobs = JobQueue(redis_url, name="t-quick", alive_ttl_s=TTL)
    job_id = jobs.submit(spec("quick", epochs=2))
    assert jobs.status(job_id)["state"] == "queued"
    burst(redis_url, "t-quick")
    out = jobs.status(job_id)
    assert out["state"] == "finished" and calls == ["quick"]
    assert out["result"]["name"] == "quick" and out["result"]["version"] == 1
    assert "all_accuracy" in out["result"]["metrics"]
    assert out["progress"]["epoch"] == out["progress"]["epochs"] == 2
    # the curve a console draws: at least one point per epoch, in order, ending at the last one
    epochs = [p["epoch"] for p in out["history"]]
    assert len(epochs) >= 2 and epochs == sorted(epochs) and epochs[-1] == 2
    assert out["history"][-1]["loss"] == out["progress"]["loss"]
    assert store.current("quick") == 1
    assert checkpoints.load(store.get("quick", 1).data, backbone).manifest.method == "coop"
    assert not jobs.conn.exists(alive_key(job_id))  # the heartbeat cleaned up after itself
    with pytest.raises(errors.Conflict):
        jobs.cancel(job_id)


def test_cancel_a_queued_job_and_it_never_runs(redis_url, in_process):
    store, calls = in_process
    jobs = JobQueue(redis_url, name="t-quick")
    job_id = jobs.submit(spec("never"))
    assert jobs.cancel(job_id)["state"] == "cancelled"
    burst(redis_url, "t-quick")
    assert calls == [] and store.names() == []
    assert jobs.status(job_id)["state"] == "cancelled"
    assert jobs.cancel(job_id)["state"] == "cancelled"  # idempotent
    assert rq_job(jobs, job_id).get_status() == JobStatus.CANCELED


def test_a_failing_run_reports_its_error_after_its_retries(
    redis_url, in_process, monkeypatch, backbone
):
    store, calls = in_process

    def broken(spec: TrainSpec, backbone: Any, batch_size: int) -> RunData:
        calls.append(spec.name)
        raise errors.BadRequest("dataset root does not exist")

    set_context(lambda: JobContext(backbone, store, broken))  # the run checks the backbone kind
    jobs = JobQueue(redis_url, name="t-quick", retries=1)
    job_id = jobs.submit(spec("broken"))
    burst(redis_url, "t-quick")
    out = jobs.status(job_id)
    assert calls == ["broken", "broken"]  # the first attempt and one retry
    assert out["state"] == "failed"
    assert out["error"] == {"code": "bad_request", "message": "dataset root does not exist"}
    assert store.names() == []


def test_submit_rejects_what_cannot_train(redis_url):
    jobs = JobQueue(redis_url, name="t-quick")
    with pytest.raises(errors.UnknownMethod):
        jobs.submit(spec().model_copy(update={"method": "nope"}))
    with pytest.raises(errors.InvalidContent, match="unknown recipe fields"):
        jobs.submit(spec().model_copy(update={"recipe": {"epochz": 3}}))
    assert jobs.queue.count == 0


def _pretend_started(jobs: JobQueue, job_id: str, age_s: float) -> None:
    """What a worker leaves behind when it dies mid-run: STARTED, out of the queue."""
    job = rq_job(jobs, job_id)
    jobs.queue.remove(job)
    job.started_at = now() - timedelta(seconds=age_s)
    job.set_status(JobStatus.STARTED)
    job.save()


def test_a_silent_started_job_is_requeued_then_failed(redis_url):
    jobs = JobQueue(redis_url, name="t-ghost", retries=1, alive_ttl_s=TTL)
    job_id = jobs.submit(spec("ghost"))
    _pretend_started(jobs, job_id, age_s=0)
    assert jobs.status(job_id)["state"] == "started"  # within its grace period
    _pretend_started(jobs, job_id, age_s=60)
    jobs.conn.set(alive_key(job_id), 1, px=5000)
    assert jobs.status(job_id)["state"] == "started"  # old but beating
    jobs.conn.delete(alive_key(job_id))
    assert jobs.status(job_id)["state"] == "queued"  # lost: its one retry puts it back
    assert job_id in jobs.queue.job_ids
    _pretend_started(jobs, job_id, age_s=60)
    out = jobs.status(job_id)
    assert out["state"] == "failed" and out["error"]["code"] == "worker_lost"
    assert rq_job(jobs, job_id).get_status() == JobStatus.FAILED
    assert job_id in jobs.queue.failed_job_registry.get_job_ids()


def test_unknown_and_malformed_ids(redis_url):
    jobs = JobQueue(redis_url, name="t-quick")
    for job_id in ("0" * 32, "../../etc", "a" * 65, ""):
        with pytest.raises(errors.NotFound):
            jobs.status(job_id)
        with pytest.raises(errors.NotFound):
            jobs.cancel(job_id)


def test_redis_down_is_store_unavailable(private_redis: RedisServer):
    jobs = JobQueue(private_redis.url, name="t-quick")
    private_redis.kill()
    with pytest.raises(errors.StoreUnavailable) as info:
        jobs.submit(spec())
    assert errors.http_status(info.value) == 503 and "127.0.0.1" in info.value.message
    with pytest.raises(errors.StoreUnavailable):
        jobs.status("0" * 32)


# --- a worker subprocess -------------------------------------------------------------------------


def test_worker_process_reports_progress_then_the_result(live, backbone):
    jobs = JobQueue(live["url"], name="t-live", alive_ttl_s=TTL)
    job_id = jobs.submit(spec("watched", epochs=4))
    seen = poll(jobs, job_id, lambda s: s["state"] in ("finished", "failed"))
    running = [s["progress"]["epoch"] for s in seen if s["state"] == "started" and "progress" in s]
    assert running and min(running) < 4, "no progress was visible while the job ran"
    out = seen[-1]
    assert out["state"] == "finished", out
    assert out["result"]["name"] == "watched" and out["result"]["version"] == 1
    store = open_store(f"file://{live['store_dir']}")
    # published by another process, valid for this one's backbone: the same seeded fingerprint
    assert checkpoints.load(store.get("watched").data, backbone).manifest.name == "watched"


def test_cancel_a_running_job_publishes_nothing(live):
    jobs = JobQueue(live["url"], name="t-live", alive_ttl_s=TTL)
    job_id = jobs.submit(spec("cancelled", epochs=50))
    poll(jobs, job_id, lambda s: s["state"] == "started" and "progress" in s)
    asked = jobs.cancel(job_id)
    # it stops at its next batch: still running when asked, or already stopped
    assert asked["state"] == "cancelled" or asked["cancel_requested"] is True
    out = poll(jobs, job_id, lambda s: s["state"] != "started", timeout=10)[-1]
    assert out["state"] == "cancelled" and out["progress"]["epoch"] < 50
    assert rq_job(jobs, job_id).get_status() == JobStatus.CANCELED
    assert "cancelled" not in open_store(f"file://{live['store_dir']}").names()


def test_a_killed_worker_leaves_the_job_failed(live):
    jobs = JobQueue(live["url"], name="t-kill", alive_ttl_s=TTL)
    job_id = jobs.submit(spec("killed", epochs=50))
    poll(jobs, job_id, lambda s: s["state"] == "started" and "progress" in s)
    proc = live["procs"]["t-kill"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = time.monotonic()
    out = poll(jobs, job_id, lambda s: s["state"] != "started", timeout=10)[-1]
    assert out["state"] == "failed" and out["error"]["code"] == "worker_lost"
    assert time.monotonic() - killed < TTL + 2
    assert rq_job(jobs, job_id).get_status() == JobStatus.FAILED
    assert job_id in jobs.queue.failed_job_registry.get_job_ids()
    assert job_id not in jobs.queue.started_job_registry.get_job_ids()
    assert "killed" not in open_store(f"file://{live['store_dir']}").names()


# --- the routes ----------------------------------------------------------------------------------


def client_for(jobs: JobQueue | None) -> TestClient:
    """The jobs router alone, with the app's error handlers and auth; no model needed."""
    settings = Settings(api_keys=READ, admin_keys=ADMIN, store="file://unused")
    app = FastAPI()
    app.state.settings, app.state.jobs = settings, jobs
    app.include_router(router)
    install(app, Metrics())
    return TestClient(app)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_routes(redis_url):
    client = client_for(JobQueue(redis_url, name="t-routes"))
    body = spec("routed").model_dump()
    assert client.post("/v1/jobs", json=body).status_code == 401
    assert client.post("/v1/jobs", json=body, headers=auth(READ)).status_code == 403
    r = client.post("/v1/jobs", json=body, headers=auth(ADMIN))
    assert r.status_code == 202 and r.json() == {"id": r.json()["id"], "state": "queued"}
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}"
    got = client.get(f"/v1/jobs/{job_id}", headers=auth(READ))
    assert got.status_code == 200 and got.json()["state"] == "queued"
    assert got.json()["name"] == "routed" and "result" not in got.json()
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth(READ)).status_code == 403
    r = client.delete(f"/v1/jobs/{job_id}", headers=auth(ADMIN))
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    r = client.get("/v1/jobs/no-such-job", headers=auth(READ))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    bad = {**body, "surprise": 1}
    r = client.post("/v1/jobs", json=bad, headers=auth(ADMIN))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = client.post("/v1/jobs", json={**body, "method": "nope"}, headers=auth(ADMIN))
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_method"


def test_routes_without_a_queue_or_with_redis_down(private_redis: RedisServer):
    r = client_for(None).get("/v1/jobs/abc", headers=auth(READ))
    assert r.status_code == 503 and "PROMPTSERVE_QUEUE" in r.json()["error"]["message"]
    client = client_for(JobQueue(private_redis.url, name="t-routes"))
    private_redis.kill()
    r = client.post("/v1/jobs", json=spec().model_dump(), headers=auth(ADMIN))
    assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
