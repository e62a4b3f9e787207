"""The supervisor with real processes (toy engine and front ends, no model): front ends on one
socket, a dead front end replaced while the others serve, a dead engine restarted, SIGTERM
stops everything, and no shared-memory segment outlives the service, even after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.engine.shm import SHM_DIR
from tests.procs import ROOT, free_port


def segments(pid: int) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"promptserve-{pid}-*"))


def ask(url: str) -> list[int]:
    return [int(x) for x in httpx.get(url, timeout=5).text.split()]


def until(predicate, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = predicate()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("condition not reached (a bound for a broken build, not a timing)")


def start(n: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.processes.toy", str(port), str(n)],
                            cwd=ROOT)  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def _is_engine(pid: int) -> bool:
    return "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def frontends_seen(url: str, want: int) -> set[int]:
    """Pids of the front ends that answered, asking until `want` distinct ones have."""
    seen: set[int] = set()
    until(lambda: seen.add(ask(url)[0]) or len(seen) >= want)
    return seen


def test_frontends_share_the_socket_and_are_replaced_engine_restarts(tmp_path):
    proc, url = start(2)
    try:
        first = frontends_seen(url, 2)  # both front ends answer on the one port
        assert len(segments(proc.pid)) == 3  # control + one slot segment per front end
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        # the other keeps serving, and a new one takes the dead one's place
        assert ask(url)[0] != victim
        until(lambda: len(frontends_seen(url, 2) - first) == 1)
        until(lambda: len(segments(proc.pid)) == 3)  # the dead one's segment is gone
        # the engine dies: restarted as generation 2, and the front ends see it
        assert ask(url)[2:] == [1, 1]
        serving = frontends_seen(url, 2)
        (engine_pid,) = [c for c in children(proc.pid) if c not in serving and _is_engine(c)]
        os.kill(engine_pid, signal.SIGKILL)
        until(lambda: ask(url)[2:] == [2, 1])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert segments(proc.pid) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_no_segment_outlives_a_kill_9_past_the_next_start():
    proc, url = start(1)
    until(lambda: ask(url))
    kids = children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the children die with it (PR_SET_PDEATHSIG) ...
    until(lambda: all(not Path(f"/proc/{k}").exists() for k in kids))
    left = segments(proc.pid)
    assert left  # kill -9 leaves its segments behind ...
    again, url2 = start(1)
    try:
        until(lambda: ask(url2))
        assert segments(proc.pid) == []  # ... and the next start removes them
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(60)
