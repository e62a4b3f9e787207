"""`promptserve serve --frontends N` (N > 1): one engine process, N HTTP front-end processes.

The supervisor (this process) holds no model and serves no request. It:
1. removes shared-memory segments a dead service left behind (`engine/shm.remove_stale`);
2. starts the engine process and waits until it is warm (the control block's ready flag);
3. binds the listening socket once and starts N front ends on it (the kernel spreads the
   connections), each given the socket, its index and the control block's name;
4. watches them: a front end that dies is replaced (its segment removed) while the others keep
   serving; an engine that dies is restarted (the front ends answer 503 meanwhile and reconnect
   to the new one by themselves), unless it died `MAX_ENGINE_RESTARTS` times within
   `RESTART_WINDOW_S`: then the service stops and exits 1, for the orchestrator to act on;
5. on SIGTERM or SIGINT: front ends first (they stop accepting and finish what is in flight),
   the engine last, then the segments; exit 0.
Children die with the supervisor (PR_SET_PDEATHSIG), so a `kill -9` here leaves no process
serving; the segments it leaves are removed at the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.engine.control import ControlBlock
from service.engine.shm import SHM_DIR, remove_stale, segment_name

log = logging.getLogger(__name__)

MAX_ENGINE_RESTARTS = 5
RESTART_WINDOW_S = 300.0
_ctx = mp.get_context("spawn")


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; a no-op elsewhere)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass(frozen=True)
class Layout:
    """Names a child needs to find the others: the control block, the engine's IPC address, the
    prefix of the front ends' slot segments."""

    service_pid: int
    control: str
    engine_address: str
    shm_dir: str = str(SHM_DIR)

    def slots(self, frontend: int, incarnation: int) -> str:
        return segment_name(self.service_pid, f"fe{frontend}-{incarnation}")


# A child's entry point: target(layout, payload, *extra) run in a spawned process.
Target = Callable[..., None]


class Supervisor:
    """Starts, watches, restarts and stops the engine and the front ends."""

    def __init__(
        self,
        engine: Target,
        frontend: Target,
        payload: Any,
        frontends: int,
        sock: socket.socket,
        ready_timeout_s: float = 3600.0,
        drain_timeout_s: float = 30.0,
    ) -> None:
        self.engine_target, self.frontend_target = engine, frontend
        self.payload, self.n, self.sock = payload, frontends, sock
        self.ready_timeout_s, self.drain_timeout_s = ready_timeout_s, drain_timeout_s
        pid = os.getpid()
        self.layout = Layout(
            service_pid=pid,
            control=segment_name(pid, "control"),
            engine_address=f"ipc://{SHM_DIR}/{segment_name(pid, 'engine.ipc')}",
        )
        self.engine: mp.process.BaseProcess | None = None
        self.generation = 0
        self.frontends: dict[int, mp.process.BaseProcess] = {}
        self.incarnations: dict[int, int] = {}
        self.engine_deaths: deque[float] = deque()
        self._stop = False

    # --- lifecycle ------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until told to stop; the exit status of the service."""
        removed = remove_stale(SHM_DIR)
        if removed:
            log.info("removed %d shared-memory segments of a dead service", len(removed))
        self.control = ControlBlock.create(self.layout.control)
        reader, writer = os.pipe()  # signals become a readable pipe: the watch loop wakes
        os.set_blocking(writer, False)
        signal.set_wakeup_fd(writer)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            self._start_engine()
            if not self._wait_ready():
                return 1
            for i in range(self.n):
                self._start_frontend(i)
            return self._watch(reader)
        finally:
            self._shutdown()
            signal.set_wakeup_fd(-1)
            os.close(reader)
            os.close(writer)

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.info("signal %d: draining front ends, then the engine", signum)
        self._stop = True

    def _start_engine(self) -> None:
        self.generation += 1
        self.control.set_engine(0, self.generation, False)
        self.engine = _ctx.Process(
            target=_child,
            args=(self.engine_target, self.layout, self.payload, self.generation),
            name="promptserve-engine",
            daemon=False,
        )
        self.engine.start()
        log.info("engine started (pid %s, generation %d)", self.engine.pid, self.generation)

    def _wait_ready(self) -> bool:
        end = time.monotonic() + self.ready_timeout_s
        assert self.engine is not None
        while time.monotonic() < end and not self._stop:
            _, generation, ready, _ = self.control.engine()
            if ready and generation == self.generation:
                return True
            if not self.engine.is_alive():
                log.error("the engine exited (%s) before it was ready", self.engine.exitcode)
                return False
            time.sleep(0.05)
        return False

    def _start_frontend(self, i: int) -> None:
        incarnation = self.incarnations.get(i, 0) + 1
        self.incarnations[i] = incarnation
        proc = _ctx.Process(
            target=_child,
            args=(self.frontend_target, self.layout, self.payload, i, incarnation, self.sock),
            name=f"promptserve-frontend-{i}",
            daemon=False,
        )
        proc.start()
        self.frontends[i] = proc

    def _watch(self, wakeup: int) -> int:
        while not self._stop:
            procs = {p.sentinel: ("engine", -1) for p in [self.engine] if p is not None}
            procs.update({p.sentinel: ("frontend", i) for i, p in self.frontends.items()})
            ready = multiprocessing.connection.wait([*procs, wakeup], timeout=1.0)
            for sentinel in ready:
                if sentinel == wakeup:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wakeup, 512)
                    continue
                role, i = procs[sentinel]  # type: ignore[index]
                if self._stop:
                    break
                if role == "frontend":
                    self._frontend_died(i)
                elif not self._engine_died():
                    return 1
        return 0

    def _frontend_died(self, i: int) -> None:
        proc = self.frontends[i]
        proc.join()
        log.error("front end %d (pid %s) exited with %s; starting a new one", i, proc.pid,
                  proc.exitcode)  # fmt: skip
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.layout.shm_dir, self.layout.slots(i, self.incarnations[i])))
        self.control.set_admitted(i, 0)  # what it had admitted died with it
        _forget_metrics(proc.pid)
        self._start_frontend(i)

    def _engine_died(self) -> bool:
        """Restart the engine; False when it keeps dying (then the service stops)."""
        assert self.engine is not None
        self.engine.join()
        code = self.engine.exitcode
        _forget_metrics(self.engine.pid)
        now = time.monotonic()
        self.engine_deaths.append(now)
        while self.engine_deaths and now - self.engine_deaths[0] > RESTART_WINDOW_S:
            self.engine_deaths.popleft()
        self.control.set_engine(0, self.generation, False)
        if len(self.engine_deaths) > MAX_ENGINE_RESTARTS:
            log.error("the engine died %d times in %.0f s (last exit %s): stopping the service",
                      len(self.engine_deaths), RESTART_WINDOW_S, code)  # fmt: skip
            return False
        log.error("the engine exited with %s; restarting it (front ends answer 503 meanwhile)",
                  code)  # fmt: skip
        self._start_engine()
        return True

    def _shutdown(self) -> None:
        """Front ends first (they drain), then the engine, then the segments."""
        for proc in self.frontends.values():
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)  # type: ignore[arg-type]
        deadline = time.monotonic() + self.drain_timeout_s + 5
        for proc in self.frontends.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        if self.engine is not None and self.engine.is_alive():
            os.kill(self.engine.pid, signal.SIGTERM)  # type: ignore[arg-type]
            self.engine.join(self.drain_timeout_s + 5)
            if self.engine.is_alive():
                self.engine.kill()
                self.engine.join()
        for i, incarnation in self.incarnations.items():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.layout.shm_dir, self.layout.slots(i, incarnation)))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.layout.engine_address.removeprefix("ipc://"))
        self.control.close()


def _forget_metrics(pid: int | None) -> None:
    """Drop a dead process's live gauges from the summed metrics (its counts stay counted)."""
    if pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def _child(target: Target, layout: Layout, payload: Any, *extra: Any) -> None:
    """A child's first steps: die with the supervisor, default signal handling, then its work."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; SIGTERM stops us
    target(layout, payload, *extra)
