"""The running batch of the continuous engine: rows in KV slots, one step at a time.

No asyncio and no clock beyond deadlines: `step` is called by engine/continuous.py's worker
thread (and directly by tests, which then decide at exactly which step each request arrives).
A row is admitted into a free slot, prefilled in chunks (its image through the vision tower under
its plan's visual prompts first, once), then decodes one token per step with every other
decoding row, whatever checkpoint each came from: after prefill, M²PT's prompts live in the row's
keys and values, so decode steps need no plan at all. A row leaves on EOS, on its
max_new_tokens, when its caller left (a client disconnect) or its deadline passed; its slot is
free for the next step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from service.backbones.llava import LlavaBackbone
from service.backbones.llava_steps import language_step, request_embeds, token_embeds
from service.engine.gen_request import Event, GenRequest, alive, generator, sample
from service.engine.kv_slots import SlotCache
from service.errors import DeadlineExceeded
from service.prompts.m2pt import batch_prompts


@dataclass(eq=False)
class Row:
    """One request in a slot: prefilling while `done < total`, then decoding."""

    request: GenRequest
    slot: int
    embeds: Tensor | None  # [1, total, d] until prefilled
    text: Tensor | None  # [1, Lt, nt, d]: deep text prompts, for the first chunk only
    total: int  # prompt positions: text prompt slots + tokens
    gen: torch.Generator | None
    head: Tensor | None = None  # the plan's own output head (None: the base's)
    done: int = 0  # positions in the cache
    pending: int = 0  # the token the next decode step feeds
    released: bool = False

    @property
    def remaining(self) -> int:
        return self.total - self.done


class SlotBatch:
    """Slots `0..n-1` decode; slots at and above `n` hold prompts being prefilled, or nothing."""

    def __init__(self, bb: LlavaBackbone, slots: int, max_len: int) -> None:
        self.bb = bb
        self.cache = SlotCache(bb.lm.config, slots, max_len, device=bb.device, dtype=bb.dtype)
        self.rows: list[Row | None] = [None] * slots
        self.n = 0  # decoding rows
        self.prefilling: list[Row] = []  # in admission order

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @property
    def free_slots(self) -> int:
        return len(self.rows) - self.n - len(self.prefilling)

    @property
    def idle(self) -> bool:
        return self.n == 0 and not self.prefilling

    def step(self, continued: list[tuple[Row, int]], admitted: list[tuple[GenRequest, int]]) -> int:
        """Prefill the given chunks (admitting the new requests first), then one decode step of
        every decoding row. Returns the rows decoded."""
        self.reap()
        work = list(continued)
        for request, take in admitted:
            if alive(request):
                try:
                    work.append((self._admit(request), take))
                except Exception as exc:  # this request's own failure (its image, its plan)
                    request.send(Event(error=exc))
        for row, take in work:
            if not row.released and take > 0:
                try:
                    self._prefill(row, take)
                except Exception as exc:  # a prefill is one row's forward: only it fails
                    row.request.send(Event(error=exc))
                    self._release(row)
        decoded = self.n
        if decoded:
            self._decode()
        self.reap()
        return decoded

    def reap(self) -> None:
        """Free the rows whose caller left or whose deadline passed (told so)."""
        now = time.monotonic()
        for row in [r for r in self.rows if r is not None]:
            request = row.request
            if request.left:
                self._release(row)
            elif request.deadline is not None and now >= request.deadline:
                request.send(Event(error=DeadlineExceeded("deadline passed while generating")))
                self._release(row)

    def fail(self, exc: BaseException) -> None:
        """A model failure: every row shares it, as is, and leaves."""
        for row in [r for r in self.rows if r is not None]:
            row.request.send(Event(error=exc))
            self._release(row)

    # --- one row ----------------------------------------------------------------------------
    def _admit(self, request: GenRequest) -> Row:
        slot = next(i for i in range(self.n, len(self.rows)) if self.rows[i] is None)
        prompts = batch_prompts([request.plan], self.bb.dtype)
        embeds = request_embeds(self.bb, request.ids, request.pixels, prompts)
        row = Row(request, slot, embeds, prompts.text, int(embeds.shape[1]),
                  generator(request.sampling.seed), head=request.plan.head)  # fmt: skip
        self.rows[slot] = row
        self.prefilling.append(row)
        return row

    def _prefill(self, row: Row, take: int) -> None:
        assert row.embeds is not None
        start = row.done
        q = min(max(take, 1), row.remaining)
        if start == 0 and row.text is not None:
            q = max(q, min(int(row.text.shape[2]), row.total))  # all prompt slots in chunk one
        self.cache.bind(row.slot, torch.tensor([start]), q)
        logits = language_step(
            self.bb, row.embeds[:, start : start + q], self.cache.positions(),
            self.cache.mask(self.bb.dtype), self.cache, row.text if start == 0 else None,
            (row.head,),
        )  # fmt: skip
        row.done += q
        if row.remaining:
            return
        row.embeds = row.text = None
        self.prefilling.remove(row)
        self._swap(row.slot, self.n)  # into the decoding block
        self.n += 1
        self._emit(row, sample(logits[0], row.request.sampling, row.gen))

    def _decode(self) -> None:
        rows = [r for r in self.rows[: self.n] if r is not None]
        starts = torch.tensor([r.done for r in rows])
        self.cache.bind(0, starts, 1)
        tokens = torch.tensor([r.pending for r in rows], dtype=torch.long)
        logits = language_step(
            self.bb, token_embeds(self.bb, tokens), self.cache.positions(),
            self.cache.mask(self.bb.dtype), self.cache, None, tuple(r.head for r in rows),
        )  # fmt: skip
        for row in rows:  # all first: a release below moves rows by their used positions
            row.done += 1
        for i, row in enumerate(rows):
            self._emit(row, sample(logits[i], row.request.sampling, row.gen))

    def _emit(self, row: Row, token: int) -> None:
        """Send a decoding row's new token (or its end) and release it when it is done."""
        request = row.request
        if request.left:
            self._release(row)
        elif token in self.bb.eos_ids:
            request.send(Event(finish_reason="stop"))
            self._release(row)
        else:
            request.generated.append(token)
            done = len(request.generated) >= request.sampling.max_new_tokens
            request.send(Event((token,), "length" if done else None))
            if done:
                self._release(row)
            row.pending = token

    # --- slots --------------------------------------------------------------------------------
    def _release(self, row: Row) -> None:
        if row.released:
            return
        row.released = True
        if row in self.prefilling:
            self.prefilling.remove(row)
            self.rows[row.slot] = None
            return
        last = self.n - 1  # keep the decoding block compact: the last row fills the hole
        self._swap(row.slot, last)
        self.rows[last] = None
        self.n -= 1

    def _swap(self, a: int, b: int) -> None:
        ra, rb = self.rows[a], self.rows[b]
        upto = max(0 if ra is None else ra.done, 0 if rb is None else rb.done)
        self.cache.swap(a, b, upto)
        self.rows[a], self.rows[b] = rb, ra
        for slot, row in ((a, rb), (b, ra)):
            if row is not None:
                row.slot = slot
