"""Concurrent writers: unique gapless numbers, and compare-and-set with exactly one winner."""

from __future__ import annotations

import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from prompts_store import Conflict, PromptStore

if TYPE_CHECKING:
    from conftest import Backend

WRITERS = 8


def _check_all_stored(store: PromptStore, name: str, got: dict[int, bytes]) -> None:
    assert sorted(got) == list(range(1, WRITERS + 1))  # unique and gapless
    assert [v.version for v in store.versions(name)] == list(range(1, WRITERS + 1))
    for version, data in got.items():
        assert store.get(name, version).data == data  # each number holds its own writer's bytes
    current = store.current(name)
    assert current in got
    assert store.get(name).data == got[current]


@pytest.mark.parametrize("shared", [True, False], ids=["one-store", "store-per-thread"])
def test_threads_get_unique_gapless_versions(backend: Backend, shared: bool) -> None:
    stores = [backend.open()] * WRITERS if shared else [backend.open() for _ in range(WRITERS)]
    barrier = threading.Barrier(WRITERS)

    def write(i: int) -> tuple[int, bytes]:
        data = f"writer-{i}".encode() * (i + 1)
        barrier.wait()
        return stores[i].put("race", data, {"writer": i}), data

    with ThreadPoolExecutor(WRITERS) as pool:
        results = list(pool.map(write, range(WRITERS)))
    _check_all_stored(stores[0], "race", dict(results))


_WRITER = """
import sys
from prompts_store import open_store
store = open_store(sys.argv[1])
data = ("process-" + sys.argv[2]).encode()
sys.stdin.readline()  # the start gate: every writer is ready before any writes
print(store.put("race", data, {"pid": sys.argv[2]}), flush=True)
"""


def test_processes_get_unique_gapless_versions(tmp_path: Path, run_python: Any) -> None:
    url = f"file://{tmp_path / 'store'}"
    procs = [
        run_python(_WRITER, url, str(i), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for i in range(WRITERS)
    ]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    got = {}
    for i, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        got[int(out)] = f"process-{i}".encode()
    from prompts_store import open_store

    store = open_store(url)
    _check_all_stored(store, "race", got)


def test_racing_activations_have_exactly_one_winner(backend: Backend) -> None:
    store = backend.open()
    other = backend.open()  # a second client, as another replica would be
    for i in range(1, 4):
        store.put("cas", f"v{i}".encode(), activate=(i == 1))
    barrier = threading.Barrier(2)

    def contender(s: PromptStore, version: int) -> Any:
        barrier.wait()
        try:
            return s.activate("cas", version, expected=1)
        except Conflict as exc:
            return exc

    wins = {2: 0, 3: 0}
    for _ in range(50):
        store.activate("cas", 1)
        with ThreadPoolExecutor(2) as pool:
            a, b = pool.map(contender, [store, other], [2, 3])
        outcomes = [a, b]
        winners = [r for r in outcomes if isinstance(r, int)]
        losers = [r for r in outcomes if isinstance(r, Conflict)]
        assert len(winners) == 1 and len(losers) == 1, outcomes
        assert store.current("cas") == winners[0]
        assert losers[0].current == winners[0]  # the loser is told who won
        wins[winners[0]] += 1
    assert sum(wins.values()) == 50
