"""The continuous batcher's policy (engine/scheduler.py): pure, so every case is exact."""

from __future__ import annotations

import pytest

from service.engine.scheduler import Waiting, plan_step


def test_running_rows_decode_first_and_prefill_gets_the_rest() -> None:
    plan = plan_step(decoding=6, prefilling=[], waiting=[Waiting(100)], free_slots=2, budget=16)
    assert plan.decode and plan.admitted == [10]  # 16 - 6 decode tokens, a chunk of a long prompt


def test_a_partly_prefilled_prompt_continues_before_new_ones_are_admitted() -> None:
    plan = plan_step(2, prefilling=[30], waiting=[Waiting(5)], free_slots=3, budget=20)
    assert plan.continued == [18] and plan.admitted == []  # nothing left for the newcomer
    plan = plan_step(2, prefilling=[8], waiting=[Waiting(5), Waiting(3)], free_slots=3, budget=20)
    assert plan.continued == [8] and plan.admitted == [5, 3]  # 2 + 8 + 5 + 3 = 18 <= 20


def test_admission_is_bounded_by_free_slots_and_in_arrival_order() -> None:
    waiting = [Waiting(4), Waiting(4), Waiting(4)]
    assert plan_step(0, [], waiting, free_slots=2, budget=100).admitted == [4, 4]
    assert plan_step(0, [], waiting, free_slots=0, budget=100).admitted == []
    # head of line: a long first chunk that does not fit now is not overtaken by a short one
    heads = [Waiting(30, min_first=11), Waiting(2)]
    assert plan_step(5, [], heads, free_slots=2, budget=15).admitted == []


def test_text_prompt_slots_come_whole_in_the_first_chunk() -> None:
    # budget 8 would cut 10 prompt slots: the first chunk takes them all (progress when idle)
    assert plan_step(0, [], [Waiting(40, min_first=11)], free_slots=1, budget=8).admitted == [11]
    # later chunks of the same prompt then follow the budget
    assert plan_step(1, [29], [], free_slots=0, budget=8).continued == [7]


def test_the_budget_must_leave_room_for_prefill() -> None:
    with pytest.raises(ValueError, match="must exceed the slots"):
        plan_step(8, [], [Waiting(3)], free_slots=0, budget=8)


def test_prefill_tokens_never_exceed_the_budget_beyond_the_first_chunk_rule() -> None:
    import random

    rng = random.Random(0)
    for _ in range(500):
        budget = rng.randint(10, 64)
        decoding = rng.randint(0, 8)
        prefilling = [rng.randint(1, 100) for _ in range(rng.randint(0, 3))]
        waiting = [Waiting(rng.randint(1, 100)) for _ in range(rng.randint(0, 5))]
        plan = plan_step(decoding, prefilling, waiting, rng.randint(0, 4), budget)
        assert decoding + plan.prefill_tokens <= budget
        assert all(0 <= c <= r for c, r in zip(plan.continued, prefilling, strict=True))
        if decoding == 0 and (prefilling or (waiting and plan.admitted)):
            assert plan.prefill_tokens > 0  # an idle engine always makes progress
