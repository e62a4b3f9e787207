"""Ad-hoc zero-shot classifiers, cached by content (class names + templates).

Clients that send the same class names again (the common case) pay the text tower once. A miss
is real work (1,000 classes x 20 templates is 20,000 text-tower passes), so it is bounded like
image work is:
- admission: the prompts being encoded at once are capped (`max_texts`); a request that would
  exceed the cap is refused at once (429), its cost being classes x templates;
- the deadline: it runs under the request's deadline (set at arrival): refused at once (504)
  when its cost at the measured rate could not fit, and checked before every chunk, so a
  request whose time is up stops costing anything;
- fairness: it runs in chunks sized to take about `CHUNK_SECONDS` (from the measured cost per
  prompt) on the model's one worker thread, after the image batches waiting there, one chunk at
  a time across all ad-hoc requests (`_lane`): an image request waits behind at most one chunk,
  and ad-hoc work never occupies the shared thread pool that decoding and loads need.
With a `text_encoder` (the ONNX runtime's text tower) the prompts go through the fast path.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

import torch
from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.checkpoints import check_classnames, check_templates
from service.errors import DeadlineExceeded, InvalidClassnames, Overloaded
from service.prompts.base import DEFAULT_TEMPLATES, ensemble, template_prompts
from service.prompts.plans import Plan

CHUNK_SECONDS = 0.04  # an image request waits behind at most about this much text work
MAX_CHUNK = 256  # prompts per text-tower call at most (the first chunk: 8, then measured)
Key = tuple[tuple[str, ...], tuple[str, ...]]
RunOnModelThread = Callable[[Callable[[], Tensor]], Awaitable[Tensor]]


class ZeroShotCache:
    """LRU of materialized zero-shot plans keyed by normalized class names and templates."""

    def __init__(
        self,
        backbone: ClipBackbone,
        entries: int = 256,
        max_classes: int = 1000,
        text_encoder: Callable[[Tensor], Tensor] | None = None,
        max_texts: int = 60_000,
        run: RunOnModelThread | None = None,
    ):
        self.backbone, self.entries, self.max_classes = backbone, entries, max_classes
        self.encode = text_encoder or backbone.encode_text_ids
        self.max_texts, self.pending = max_texts, 0
        self.run: RunOnModelThread = run or _in_a_thread
        self._plans: OrderedDict[Key, Plan] = OrderedDict()
        self._inflight: dict[Key, asyncio.Future[Plan]] = {}
        self._lock = threading.Lock()
        self._lane = asyncio.Lock()
        self.hits = self.misses = 0
        self.seconds_per_prompt: float | None = None  # measured; sizes the chunks

    def key(self, classnames: Sequence[str], templates: Sequence[str] | None) -> Key:
        """The validated content key (4xx for bad class names or templates)."""
        return adhoc_key(classnames, templates, self.max_classes)

    async def plan(
        self,
        classnames: Sequence[str],
        templates: Sequence[str] | None,
        deadline: float | None = None,
    ) -> Plan:
        """The zero-shot plan for these classes (computed once per content, event loop only)."""
        key = self.key(classnames, templates)
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                self.hits += 1
                return plan
        if (waiting := self._inflight.get(key)) is not None:
            return await asyncio.shield(waiting)  # the same classes are being encoded already
        cost = len(key[0]) * len(key[1])
        if self.pending + cost > self.max_texts:
            raise Overloaded(
                f"server busy encoding ad-hoc class names ({self.pending} prompts in flight; this "
                f"request needs {cost}); retry with backoff, or upload a checkpoint"
            )
        if deadline is not None and self.seconds_per_prompt is not None:
            estimate = cost * self.seconds_per_prompt
            if time.monotonic() + estimate > deadline:  # refuse before spending anything
                raise DeadlineExceeded(
                    f"{cost} ad-hoc prompts ({len(key[0])} classes x {len(key[1])} templates) "
                    f"would take about {estimate:.0f} s to encode, past this request's deadline; "
                    "send fewer classes or templates, or upload a checkpoint"
                )
        self.misses += 1
        self.pending += cost
        future: asyncio.Future[Plan] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            plan = await self._materialize(key, deadline)
            future.set_result(plan)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            self.pending -= cost
            del self._inflight[key]
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self.entries:
                self._plans.popitem(last=False)
        return plan

    async def _materialize(self, key: Key, deadline: float | None) -> Plan:
        names, temps = key
        per_template = []
        for template in temps:
            prompts = template_prompts(names, template)
            chunks: list[Tensor] = []
            done = 0
            while done < len(prompts):
                async with self._lane:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise DeadlineExceeded("deadline passed while encoding the class names")
                    part = prompts[done : done + self.chunk_size()]
                    chunks.append(await self.run(functools.partial(self._features, part)))
                    done += len(part)
            per_template.append(torch.cat(chunks))
        return Plan(
            labels=names,
            logit_scale=self.backbone.logit_scale,
            classes=ensemble(per_template).to(self.backbone.device),
        )

    def chunk_size(self) -> int:
        """Prompts per text-tower call: about CHUNK_SECONDS of work at the measured rate."""
        if self.seconds_per_prompt is None:
            return 8
        return max(1, min(MAX_CHUNK, int(CHUNK_SECONDS / self.seconds_per_prompt)))

    @torch.no_grad()
    def _features(self, prompts: list[str]) -> Tensor:
        start = time.perf_counter()
        out = self.encode(self.backbone.tokenize(prompts)).float()
        per = (time.perf_counter() - start) / len(prompts)
        last = self.seconds_per_prompt
        self.seconds_per_prompt = per if last is None else 0.7 * last + 0.3 * per
        return out


def adhoc_key(classnames: Sequence[str], templates: Sequence[str] | None, max_classes: int) -> Key:
    """Ad-hoc class names and templates, validated (4xx) and normalized: the cache's key."""
    if len(classnames) > max_classes:
        raise InvalidClassnames(
            f"{len(classnames)} ad-hoc class names; at most {max_classes} per request "
            "(upload a checkpoint for larger label sets)"
        )
    names = tuple(check_classnames(list(classnames)))
    temps = tuple(check_templates(list(templates or ()))) or DEFAULT_TEMPLATES
    return names, temps


async def _in_a_thread(fn: Callable[[], Tensor]) -> Tensor:
    return await asyncio.to_thread(fn)
