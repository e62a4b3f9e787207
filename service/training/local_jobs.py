"""Training jobs without Redis: the embedded file store's service runs them itself.

One child process (spawned, never forked: CUDA and the service's threads do not survive a fork)
loads the backbone from the service's settings once and runs queued jobs one at a time; the
service stays responsive because training never shares its interpreter. The API is the same as
`JobQueue`'s (submit / status / cancel / close) and so are the states and the error codes:

- progress, results and errors come back over a multiprocessing queue, read by one thread;
- cancel sets a shared flag the child checks before every batch (a queued job is dropped at once);
- a child that dies mid-run (killed, out of memory) fails its job with `worker_lost`, or requeues
  it while retries are left; the next job gets a fresh child. `runs.run` publishes only at the
  very end, so a dead child leaves nothing partial in the store.

Jobs live in this process's memory: they are gone after a restart (the checkpoints they
published are not). A multi-replica deployment uses Redis and `promptserve worker` instead.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue as stdqueue
import threading
import uuid
from collections import OrderedDict, deque
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service import errors
from service.settings import Settings
from service.training import job_history
from service.training.runs import TrainSpec

if TYPE_CHECKING:
    from service.training.jobs import JobQueue

log = logging.getLogger(__name__)

KEEP = 500  # ended jobs remembered; the oldest are forgotten first
_ID_BYTES = 32


def _now() -> str:
    return datetime.now(UTC).isoformat()


class LocalJobs:
    """Submit, read and cancel training jobs run by a child process of this service."""

    def __init__(self, settings: Settings, *, retries: int = 0, out_dir: Path | None = None):
        self.settings, self.retries, self.out_dir = settings, retries, out_dir
        self._mp = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._specs: dict[str, str] = {}
        self._waiting: deque[str] = deque()
        self._running: str | None = None
        self._cancel: Any = self._mp.Array("c", _ID_BYTES + 1)  # id of the job to stop, or empty
        self._events: Any = None
        self._tasks: Any = None
        self._child: Any = None
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="local-jobs", daemon=True)
        self._thread.start()

    # --- the JobQueue interface ---------------------------------------------------------------

    def submit(self, spec: TrainSpec) -> str:
        """Queue a run after the checks that need no backbone."""
        from service.training.jobs import check_spec

        check_spec(spec)
        job_id = uuid.uuid4().hex
        with self._lock:
            self._jobs[job_id] = {
                "id": job_id, "state": "queued", "name": spec.name, "method": spec.method,
                "created_at": _now(), "retries_left": self.retries,
            }  # fmt: skip
            self._specs[job_id] = spec.model_dump_json()
            self._waiting.append(job_id)
            self._forget_old()
        self._wake.set()
        return job_id

    def status(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            return self._describe(self._get(job_id))

    def cancel(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            job = self._get(job_id)
            if job["state"] in ("finished", "failed"):
                raise errors.Conflict(f"job {job_id} already {job['state']}")
            if job["state"] == "queued":
                self._waiting.remove(job_id)
                self._end(job, "cancelled")
            elif job["state"] == "started":
                job["cancel_requested"] = True
                self._cancel.value = job_id.encode()
            return self._describe(job)

    def close(self) -> None:
        """Stop the child (a running job is lost, as with a killed worker) and the reader."""
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self._stop_child()

    # --- bookkeeping (under the lock) ---------------------------------------------------------

    def _get(self, job_id: str) -> dict[str, Any]:
        job = self._jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise errors.NotFound(f"no training job {job_id[:80]!r}")
        return job

    @staticmethod
    def _describe(job: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in job.items() if k != "retries_left" and v is not None}
        if out["state"] != "started":
            out.pop("cancel_requested", None)
        return out

    def _end(self, job: dict[str, Any], state: str, **values: Any) -> None:
        job.update(state=state, ended_at=_now(), **values)
        self._specs.pop(job["id"], None)

    def _forget_old(self) -> None:
        ended = [k for k, j in self._jobs.items() if "ended_at" in j]
        for key in ended[: max(0, len(ended) - KEEP)]:
            del self._jobs[key]

    # --- the reader thread --------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closed.is_set():
            try:
                self._dispatch()
                self._drain()
            except Exception:  # never let bookkeeping kill the thread that owns every job
                log.exception("local training jobs: unexpected error")
            if self._running is None and not self._waiting:
                self._wake.wait(0.5)
                self._wake.clear()

    def _dispatch(self) -> None:
        with self._lock:
            if self._running is not None or not self._waiting:
                return
            job_id = self._waiting.popleft()
            job = self._jobs[job_id]
            spec_json = self._specs[job_id]
            self._running = job_id
            job.update(state="started", started_at=_now(), progress=None, history=None, error=None)
            self._cancel.value = b""
        if self._child is None or not self._child.is_alive():
            self._start_child()
        self._tasks.put((job_id, spec_json))

    def _start_child(self) -> None:
        self._stop_child()
        self._events, self._tasks = self._mp.Queue(), self._mp.Queue()
        self._child = self._mp.Process(
            target=child_main,
            args=(self.settings.model_dump_json(), self._tasks, self._events, self._cancel,
                  str(self.out_dir) if self.out_dir else None),
            name="promptserve-train", daemon=True,
        )  # fmt: skip
        self._child.start()
        log.info("training process started (pid %s)", self._child.pid)

    def _stop_child(self) -> None:
        if self._child is not None and self._child.is_alive():
            self._child.terminate()
            self._child.join(5)
            if self._child.is_alive():
                self._child.kill()
                self._child.join()
        self._child = None

    def _drain(self) -> None:
        if self._running is None:
            return
        try:
            event = self._events.get(timeout=0.2)
        except stdqueue.Empty:
            if self._child is not None and not self._child.is_alive():
                self._lost()
            return
        kind, job_id, value = event
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job_id != self._running:
                return
            if kind == "progress":
                job["progress"] = value
                job["history"] = job_history.extend(job.get("history"), value)
                return
            self._running = None
            job.pop("cancel_requested", None)
            if kind == "finished":
                self._end(job, "finished", result=value)
            elif kind == "cancelled":
                self._end(job, "cancelled")
            else:
                self._end(job, "failed", error=value)
        self._wake.set()

    def _lost(self) -> None:
        code = self._child.exitcode if self._child is not None else None
        with self._lock:
            job_id, self._running = self._running, None
            if job_id is None or job_id not in self._jobs:
                return
            job = self._jobs[job_id]
            if job.get("cancel_requested"):
                self._end(job, "cancelled")
            elif job["retries_left"] > 0:
                job["retries_left"] -= 1
                job.update(state="queued", progress=None, history=None)
                self._waiting.appendleft(job_id)
            else:
                self._end(job, "failed", error={
                    "code": "worker_lost",
                    "message": f"the training process stopped (exit code {code}) in the middle "
                    "of this job; nothing was published",
                })  # fmt: skip
            log.warning("training process lost (exit code %s) running job %s", code, job_id)


def child_main(settings_json: str, tasks: Any, events: Any, cancel: Any, out_dir: str | None):
    """The training process: load the backbone once, then run jobs until told to stop."""
    from service.training.jobs import PROGRESS_KEYS, context_from_settings, error_of
    from service.training.runs import run, summary
    from service.training.trainer import Cancelled

    logging.basicConfig(level=logging.INFO)
    settings = Settings.model_validate_json(settings_json)
    ctx = None
    while (task := tasks.get()) is not None:
        job_id, spec_json = task
        try:
            if ctx is None:  # a missing weight fails this job with a clear error, not the child
                ctx = context_from_settings(settings, Path(out_dir) if out_dir else None)
            spec = TrainSpec.model_validate_json(spec_json)

            def progress(row: dict[str, Any], job_id: str = job_id) -> None:
                events.put(("progress", job_id, {k: row[k] for k in PROGRESS_KEYS if k in row}))

            def stop(job_id: str = job_id) -> bool:
                return bool(cancel.value == job_id.encode())

            result = run(
                spec, ctx.backbone, ctx.store, ctx.load_data, out_dir=ctx.out_dir,
                progress=progress, should_stop=stop,
            )  # fmt: skip
        except Cancelled:
            events.put(("cancelled", job_id, None))
        except Exception as exc:
            log.exception("job %s failed", job_id)
            events.put(("failed", job_id, error_of(exc)))
        else:
            p = result.published
            out = {"name": p.name, "version": p.version, "metrics": summary(result.metrics)}
            events.put(("finished", job_id, out))


def jobs_for(settings: Settings) -> JobQueue | LocalJobs | None:
    """What runs training jobs for a service with these settings: the Redis queue when there is
    one (`promptserve worker` processes run them), else this service's own child process
    (`PROMPTSERVE_LOCAL_JOBS`), else nothing (the jobs routes answer 503 and say why)."""
    from service.training.jobs import JobQueue
    from service.training.queue_conn import queue_url_for

    queue_url = queue_url_for(settings.queue, settings.store)
    if queue_url is not None:  # lazy client: a Redis outage answers 503 on /v1/jobs only
        return JobQueue(queue_url, retries=settings.job_retries, timeout_s=settings.job_timeout_s)
    if settings.local_jobs:
        runs = Path(settings.runs_dir) if settings.runs_dir else None
        return LocalJobs(settings, retries=settings.job_retries, out_dir=runs)
    return None
