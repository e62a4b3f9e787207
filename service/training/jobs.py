"""Training jobs: a queue on Redis (RQ), the function a `promptserve worker` runs, and status.

A job is one `runs.run(spec, ...)` in a worker process; the API process only enqueues, reads and
cancels. What RQ's state machine cannot say on its own, we add:

- liveness: a running job refreshes `promptserve:job:{id}:alive` (short TTL) from a thread. A job
  RQ calls "started" whose key expired lost its worker (SIGKILL, OOM, power); the first reader to
  notice moves it, in one Redis transaction, to RQ's FailedJobRegistry (or requeues it when
  retries are left), so every reader sees the same state afterwards.
- cooperative cancel: `cancel` sets `promptserve:job:{id}:cancel`; a queued job is also cancelled
  in RQ (never runs); a running one sees the flag at its next batch, raises `Cancelled` inside
  `run` (publishing nothing) and is recorded as RQ's CANCELED.

Jobs are serialized as JSON, not pickle: readable in Redis, and loading them runs no code.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from rq import Queue, Retry, SimpleWorker, get_current_job
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.serializers import JSONSerializer
from rq.utils import now

import prompts_store as ps
from service import errors
from service.backbones.base import Backbone
from service.backbones.registry import load_backbone
from service.prompts import get_method
from service.settings import Settings
from service.training import job_history
from service.training.datasets import check_kind, load_data, uploaded
from service.training.queue_conn import connect, redis_errors
from service.training.runs import DataLoaderFn, TrainSpec, run, summary
from service.training.trainer import Cancelled

log = logging.getLogger(__name__)

QUEUE_NAME = "promptserve-train"
ALIVE_TTL_S = 5.0  # a job is presumed dead this long after its last heartbeat
KEEP_S = 7 * 24 * 3600  # how long finished / failed / cancelled jobs stay readable
TIMEOUT_S = 24 * 3600  # RQ's default (180 s) would kill any real training run
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_STATES = {  # RQ's status -> ours (CREATED, QUEUED, DEFERRED, SCHEDULED: "queued")
    JobStatus.STARTED: "started", JobStatus.FINISHED: "finished", JobStatus.FAILED: "failed",
    JobStatus.STOPPED: "failed", JobStatus.CANCELED: "cancelled",
}  # fmt: skip
PROGRESS_KEYS = ("epoch", "epochs", "step", "steps", "loss", "acc", "eta_s")
_CANCELLED = {"cancelled": True}  # what `execute` returns when it stopped on request


def alive_key(job_id: str) -> str:  # refreshed by the running job; gone = worker lost
    return f"promptserve:job:{job_id}:alive"


def cancel_key(job_id: str) -> str:  # set by cancel(); the job checks it before every batch
    return f"promptserve:job:{job_id}:cancel"


class JobQueue:
    """Submit, read and cancel training jobs on an RQ queue."""

    def __init__(
        self, url: str, *, name: str = QUEUE_NAME, retries: int = 0, timeout_s: int = TIMEOUT_S,
        alive_ttl_s: float = ALIVE_TTL_S,
    ) -> None:  # fmt: skip
        self.conn = connect(url)  # lazy: nothing is dialled until the first call
        self.queue = Queue(name, connection=self.conn, serializer=JSONSerializer)
        self.retries, self.timeout_s, self.alive_ttl_s = retries, timeout_s, alive_ttl_s

    def close(self) -> None:
        self.conn.close()

    def submit(self, spec: TrainSpec) -> str:
        """Enqueue a run after the checks that need no backbone (see `check_spec`)."""
        check_spec(spec)
        with redis_errors(self.conn):
            job = self.queue.enqueue(
                execute, args=(spec.model_dump_json(),), kwargs={"alive_ttl_s": self.alive_ttl_s},
                job_timeout=self.timeout_s, result_ttl=KEEP_S, failure_ttl=KEEP_S,
                retry=Retry(max=self.retries) if self.retries > 0 else None,
                description=f"train {spec.method} -> {spec.name}",
                meta={"name": spec.name, "method": spec.method},
            )  # fmt: skip
        return str(job.id)

    def status(self, job_id: str) -> dict[str, Any]:
        """{id, state, ...}: progress while running, result when finished, error when failed."""
        with redis_errors(self.conn):
            return self._describe(self._settled(self._fetch(job_id)))

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel: a queued job never runs; a running one stops at its next batch."""
        with redis_errors(self.conn):
            job = self._settled(self._fetch(job_id))
            status = job.get_status()
            if status in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED):
                raise errors.Conflict(f"job {job_id} already {_STATES[status]}")
            if status != JobStatus.CANCELED:
                # The flag first: a worker that dequeued the job a moment ago still sees it.
                self.conn.set(cancel_key(job.id), 1, ex=KEEP_S)
                if status != JobStatus.STARTED:  # still waiting: take it out of the queue
                    settle_cancelled(job)
            return self._describe(self._settled(self._fetch(job_id)))

    def _fetch(self, job_id: str) -> Job:
        if not _ID.fullmatch(job_id):
            raise errors.NotFound(f"no training job {job_id[:80]!r}")
        try:
            job = Job.fetch(job_id, connection=self.conn, serializer=JSONSerializer)
        except NoSuchJobError:
            raise errors.NotFound(f"no training job {job_id!r}") from None
        if job.origin != self.queue.name or job.func_name != f"{__name__}.execute":
            raise errors.NotFound(f"no training job {job_id!r}")  # some other RQ job
        return job

    def _settled(self, job: Job) -> Job:
        """The job with what only we know written into RQ: lost workers, cooperative cancels."""
        status = job.get_status()
        if status == JobStatus.STARTED and self._lost(job):
            settle_lost(job, self.queue)
        elif status == JobStatus.FINISHED and job.return_value() == _CANCELLED:
            settle_cancelled(job)  # normally done by the worker; this covers a plain rq worker
        else:
            return job
        return self._fetch(job.id)

    def _lost(self, job: Job) -> bool:
        ttl = float(job.kwargs.get("alive_ttl_s", ALIVE_TTL_S))
        # Between RQ marking the job started and its first heartbeat, give it one TTL of grace.
        young = job.started_at is not None and (now() - job.started_at).total_seconds() < ttl
        return not young and not self.conn.exists(alive_key(job.id))

    def _describe(self, job: Job) -> dict[str, Any]:
        status = job.get_status()
        out: dict[str, Any] = {
            "id": job.id,
            "state": _STATES.get(status, "queued"),
            "name": job.meta.get("name"),
            "method": job.meta.get("method"),
        }
        for key in ("created_at", "started_at", "ended_at"):
            if (t := getattr(job, key)) is not None:
                out[key] = t.isoformat()
        if job.meta.get("progress"):
            out["progress"] = job.meta["progress"]
        if job.meta.get("history"):
            out["history"] = job.meta["history"]
        if status == JobStatus.FINISHED:
            out["result"] = job.return_value()
        elif out["state"] == "failed":
            out["error"] = job.meta.get("error") or {
                "code": "training_failed",
                "message": (job.exc_info or "the job failed").strip().splitlines()[-1][:500],
            }
        elif status == JobStatus.STARTED and self.conn.exists(cancel_key(job.id)):
            out["cancel_requested"] = True
        return out


def check_spec(spec: TrainSpec) -> None:
    """What can be refused before a job is queued: method, config, recipe, dataset kind, and the
    uploaded images (the data files are the worker's to read)."""
    method = get_method(spec.method)  # UnknownMethod (422)
    if method.recipe is None:
        raise errors.InvalidContent(f"method {spec.method!r} has nothing to train")
    method.config(spec.method_config)  # InvalidConfig (422)
    try:
        method.recipe.with_overrides(spec.recipe)
    except (ValueError, TypeError) as exc:
        raise errors.InvalidContent(f"recipe: {exc}") from exc
    check_kind(method, spec)
    if spec.dataset.kind == "upload":
        uploaded(spec)  # decodes every image: a bad one is a 4xx now, not a failed job later


def settle_lost(job: Job, queue: Queue) -> None:
    """A started job whose worker stopped beating: requeue it (retries left) or fail it."""
    with job.connection.pipeline() as pipe:
        try:
            pipe.watch(job.key, alive_key(job.id))
            if pipe.hget(job.key, "status") != b"started" or pipe.exists(alive_key(job.id)):
                return  # someone settled it first, or it is alive after all
            pipe.multi()
            queue.started_job_registry.remove_executions(job, pipeline=pipe)
            retry = bool(job.retries_left)
            if retry:
                job.retry(queue, pipe)
            else:
                job.meta["error"] = {
                    "code": "worker_lost",
                    "message": "the worker running this job stopped sending heartbeats "
                    "(killed or crashed); nothing was published",
                }
                pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
                record_job_failure(job, "worker lost: no heartbeat", pipe)
            pipe.execute()
            log.warning("job %s lost its worker: %s", job.id, "requeued" if retry else "failed")
        except redis.WatchError:
            pass  # another reader settled it concurrently


def settle_cancelled(job: Job) -> None:
    """Record a job as RQ's CANCELED (a cancel racing another is the same outcome)."""
    with suppress(InvalidJobOperation):
        job.cancel()


# --- the worker side -------------------------------------------------------------------------


@dataclass(frozen=True)
class JobContext:
    """What a run needs besides its spec; built once per worker process."""

    backbone: Backbone
    store: ps.PromptStore
    load_data: DataLoaderFn
    out_dir: Path | None = None


# RQ calls jobs by import path and cannot be handed objects, so the worker's backbone, store and
# data loader live here, built on first use and kept for the process's life (loading a backbone
# per job would cost more than many runs). Tests and embedders replace the factory. No lock:
# a TrainWorker runs one job at a time, in its main thread.
_factory: Callable[[], JobContext] | None = None
_context: JobContext | None = None


def set_context(factory: Callable[[], JobContext] | None) -> None:
    """Use `factory` to build the worker's context (None: from Settings()); drops the cached one."""
    global _factory, _context
    _factory, _context = factory, None


def context() -> JobContext:
    """The worker's context, built on first use."""
    global _context
    if _context is None:
        _context = (_factory or context_from_settings)()
    return _context


def context_from_settings(
    settings: Settings | None = None, out_dir: Path | None = None
) -> JobContext:
    """Backbone and store from settings (default: PROMPTSERVE_* variables), real datasets;
    `out_dir` keeps each run's curves and run.json."""
    s = settings or Settings()
    return JobContext(load_backbone(s), ps.open_store(s.store), load_data, out_dir)


class _Heartbeat:
    """Refreshes the job's alive key; notices when the job was settled as lost behind its back."""

    def __init__(self, job: Job, ttl_s: float) -> None:
        self.job, self.ttl_ms = job, max(int(ttl_s * 1000), 200)
        self.lost = threading.Event()
        self._done = threading.Event()
        self._beat()  # before returning: a reader must never see this job started and silent
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{job.id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        conn = self.job.connection
        try:
            conn.set(alive_key(self.job.id), os.getpid(), px=self.ttl_ms)
            if conn.hget(self.job.key, "status") not in (b"started", None):
                self.lost.set()  # a reader presumed us dead: stop before publishing twice
        except redis.RedisError as exc:
            log.warning("job %s: heartbeat failed: %s", self.job.id, exc)

    def _loop(self) -> None:
        while not self._done.wait(self.ttl_ms / 5000):  # five beats per TTL
            self._beat()

    def cancel_requested(self) -> bool:
        try:
            return bool(self.job.connection.exists(cancel_key(self.job.id)))
        except redis.RedisError:
            return False  # a Redis blip does not stop training; the heartbeat reports it

    def should_stop(self) -> bool:
        """Checked before every batch: cancelled, or presumed dead by a reader."""
        return self.lost.is_set() or self.cancel_requested()

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        with suppress(redis.RedisError):  # else the key expires on its own
            self.job.connection.delete(alive_key(self.job.id))


def _save_meta(job: Job, **values: Any) -> None:
    job.meta.update(values)
    try:
        job.save_meta()
    except redis.RedisError as exc:  # progress is advisory: never fail a run over it
        log.warning("job %s: could not save progress: %s", job.id, exc)


def error_of(exc: BaseException) -> dict[str, str]:
    """The {code, message} a failed job reports."""
    if isinstance(exc, errors.PromptServeError):
        return {"code": exc.code, "message": exc.message[:2000]}
    return {"code": "training_failed", "message": f"{type(exc).__name__}: {exc}"[:2000]}


def execute(spec_json: str, alive_ttl_s: float = ALIVE_TTL_S) -> dict[str, Any]:
    """Run one training job inside an RQ worker; returns {name, version, metrics}."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("execute() runs inside an RQ worker")
    spec = TrainSpec.model_validate_json(spec_json)
    _save_meta(job, error=None, progress=None, history=None)  # a retried job starts clean
    beat = _Heartbeat(job, alive_ttl_s)
    try:
        if beat.cancel_requested():
            return dict(_CANCELLED)  # cancelled between dequeue and start
        ctx = context()

        history: list[dict[str, Any]] = []

        def progress(row: dict[str, Any]) -> None:
            if not beat.lost.is_set():  # a settled job's meta holds the reader's verdict
                keys = PROGRESS_KEYS
                job_history.extend(history, row)
                _save_meta(job, progress={k: row[k] for k in keys if k in row}, history=history)

        try:
            result = run(
                spec, ctx.backbone, ctx.store, ctx.load_data, out_dir=ctx.out_dir,
                progress=progress, should_stop=beat.should_stop,
            )  # fmt: skip
        except Cancelled:
            if not beat.cancel_requested():
                raise  # stopped because a reader presumed this job lost: it is failed already
            log.info("job %s cancelled; nothing published", job.id)
            return dict(_CANCELLED)
        except Exception as exc:
            _save_meta(job, error=error_of(exc))
            raise
    finally:
        beat.close()
    metrics = summary(result.metrics)  # what the manifest records: no per-class tables
    return {"name": result.published.name, "version": result.published.version, "metrics": metrics}


class TrainWorker(SimpleWorker):
    """Runs jobs in its own process, no fork: the cached backbone serves every job, and CUDA
    (which cannot survive a fork) works. Records cooperative cancels as CANCELED at once."""

    def handle_job_success(self, job: Job, *args: Any, **kwargs: Any) -> None:
        super().handle_job_success(job, *args, **kwargs)
        if job.return_value() == _CANCELLED:
            settle_cancelled(job)


def run_worker(
    url: str, *, name: str = QUEUE_NAME, burst: bool = False, preload: bool = True
) -> bool:
    """Work the training queue until stopped (or until empty with `burst`)."""
    if preload:
        context()  # load the backbone now: missing weights fail at start, not in the first job
    conn = connect(url)
    queue = Queue(name, connection=conn, serializer=JSONSerializer)
    worker = TrainWorker([queue], connection=conn, serializer=JSONSerializer)
    return bool(worker.work(burst=burst, logging_level="INFO"))
