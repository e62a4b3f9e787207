"""The continuous batcher's policy, with no torch and no clock: what one step computes.

The policy is the one vLLM's V1 scheduler describes (and Sarathi-Serve's "decode-maximal"
batching): every step has a token budget; the running rows decode first, one token each, so a
long prompt never stalls running streams; what is left of the budget goes to prefills, first to
prompts already partly prefilled (first come, first served), then to waiting requests, which are
admitted in arrival order while a KV slot is free. A prompt longer than what is left is cut into
chunks and finished in later steps. Unlike vLLM, nothing is preempted: a slot is reserved for a
request's whole length at admission (prompt + max_new_tokens), so a running row never runs out of
KV memory, and a request that does not fit waits (or is refused with 429 when the queue is full).

One exception to the budget: a prompt with M²PT text prompts must have all its prompt slots in its
first chunk (they are written at every layer during that forward), so its first chunk is at least
`min_first` tokens even if the budget is smaller; and when nothing else runs, a prefill always
makes progress.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Waiting:
    """A request waiting for a slot: its prompt length (KV positions) and smallest first chunk."""

    tokens: int
    min_first: int = 1


@dataclass(frozen=True)
class StepPlan:
    """What one step runs: prefill chunk sizes (for the partly prefilled prompts, in order; 0 =
    not this step), how many waiting requests are admitted (a prefix of the queue) with their
    first chunks, and whether the running rows decode."""

    continued: list[int] = field(default_factory=list)
    admitted: list[int] = field(default_factory=list)
    decode: bool = False

    @property
    def prefill_tokens(self) -> int:
        return sum(self.continued) + sum(self.admitted)


def plan_step(
    decoding: int,
    prefilling: Sequence[int],
    waiting: Sequence[Waiting],
    free_slots: int,
    budget: int,
) -> StepPlan:
    """One step's work.

    `decoding`: rows that decode this step; `prefilling`: prompt tokens left for each partly
    prefilled request (it holds a slot already); `waiting`: the queue, in arrival order;
    `free_slots`: slots neither decoding nor prefilling; `budget`: tokens per step.
    """
    if budget <= decoding:
        raise ValueError(
            f"a token budget of {budget} leaves nothing for prefill beside "
            f"{decoding} decoding rows: it must exceed the slots"
        )
    left = budget - decoding
    continued: list[int] = []
    for remaining in prefilling:
        take = min(remaining, max(left, 0))  # the first one always gets some: budget > decoding
        continued.append(take)
        left -= take
    admitted: list[int] = []
    for request in waiting[:free_slots]:
        idle = decoding == 0 and not any(continued) and not admitted
        if left < request.min_first and not idle:
            break  # head-of-line: later requests do not jump ahead of this one
        take = max(request.min_first, min(request.tokens, max(left, 0)))
        admitted.append(min(take, request.tokens))
        left -= take
    return StepPlan(continued, admitted, decoding > 0)
