"""Routes and their dependencies run on the event loop, never in the thread pool: the pool is
where image decoding and store calls wait, and a crowd filling it would otherwise delay even the
cheap answers (auth, 429) by seconds (bench/load.py, docs/RELIABILITY.md)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from service.api import answer, checkpoints, classify, jobs, ops


def calls(dependant: Dependant) -> Iterator[Any]:
    if dependant.call is not None:
        yield dependant.call
    for dep in dependant.dependencies:
        yield from calls(dep)


def is_async(call: Any) -> bool:
    return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(
        getattr(call, "__call__", None)  # noqa: B004  (class-based dependencies)
    )


def test_no_route_or_dependency_of_ours_runs_in_the_thread_pool():
    ours = []
    routes = [r for m in (answer, checkpoints, classify, jobs, ops) for r in m.router.routes]
    for route in routes:
        if isinstance(route, APIRoute):
            for call in calls(route.dependant):
                module = getattr(call, "__module__", "") or type(call).__module__
                if module.startswith("service"):
                    ours.append((route.path, getattr(call, "__name__", repr(call)), is_async(call)))
    assert len(ours) > 10
    assert [o for o in ours if not o[2]] == []
