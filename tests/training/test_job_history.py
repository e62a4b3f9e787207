"""The bounded curve a job keeps: every point while short, thinned (never unbounded) when long."""

from __future__ import annotations

import itertools

from service.training.job_history import HISTORY_KEYS, MAX_POINTS, extend


def row(step: int) -> dict[str, float]:
    return {"epoch": 1 + step // 10, "step": step, "loss": 1 / (1 + step), "acc": 0.5,
            "epochs": 99, "eta_s": None}  # fmt: skip


def test_short_runs_keep_every_point_and_only_the_curve_fields():
    history = None
    for step in range(1, 11):
        history = extend(history, row(step))
    assert history is not None and [p["step"] for p in history] == list(range(1, 11))
    assert all(set(p) == set(HISTORY_KEYS) for p in history)


def test_long_runs_stay_bounded_and_keep_the_first_and_latest_points():
    history: list = []
    for step in range(1, 100_001):
        extend(history, row(step))
        assert len(history) <= MAX_POINTS
    steps = [p["step"] for p in history]
    assert steps[0] == 1 and steps[-1] == 100_000 and steps == sorted(steps)
    assert len(history) == MAX_POINTS
    # spread evenly over the whole run: no stretch of it lost, none over-detailed
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    even = 100_000 / (MAX_POINTS - 1)
    assert max(gaps) <= 2 * even and min(gaps[:-1]) >= even / 2
