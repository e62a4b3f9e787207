"""Residency: the serving side's view of the store.

Checkpoints load on first use (validated, materialized to Plans) and stay in an LRU under a
memory budget, in tiers: device -> host -> store. A burst of requests for a cold checkpoint loads
it once. A watcher thread follows the store's change events: when the pointer of a name we serve
moves, the new version is loaded and validated in the background and swapped in atomically. A
request holds the `Resident` it resolved, so requests already running finish on the version they
started with; a version that fails validation never replaces a good one. `name@version` pins.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

import prompts_store as ps
from prompts_store.names import check_version
from service import checkpoints, errors
from service.backbones.base import Backbone
from service.checkpoints import Manifest
from service.checkpoints.store_errors import store_errors
from service.prompts.plans import ServingPlan

log = logging.getLogger(__name__)

Key = tuple[str, int]
P = TypeVar("P", bound=ServingPlan)


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`name` or `name@version` -> (name, version or None); malformed refs are a 400."""
    name, sep, version = ref.partition("@")
    try:
        name = ps.check_name(name)
        if sep and not (version.isascii() and version.isdigit() and len(version) <= 12):
            raise ps.InvalidName(f"a version must be an integer >= 1, not {version[:20]!r}")
        pinned = check_version(int(version)) if sep else None
    except ps.InvalidName as exc:
        raise errors.BadRequest(f"invalid checkpoint reference {ref[:80]!r}: {exc}") from exc
    return name, pinned


@dataclass(frozen=True, eq=False)
class Resident(Generic[P]):
    """One loaded checkpoint version: what a request holds while it runs."""

    name: str
    version: int
    plan: P
    manifest: Manifest

    @property
    def nbytes(self) -> int:
        return self.plan.nbytes


@dataclass
class ResidencyStats:
    """Counters the metrics endpoint exports (and tests and benchmarks read)."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_failures: int = 0
    swaps: int = 0
    swap_failures: int = 0
    demotions: int = 0
    evictions: int = 0
    load_seconds: list[float] = field(default_factory=list)


class _Tier(Generic[P]):
    """An LRU of residents on one device under a byte budget."""

    def __init__(self, device: torch.device, budget: int) -> None:
        self.device, self.budget, self.used = device, budget, 0
        self.items: OrderedDict[Key, Resident[P]] = OrderedDict()

    def pop(self, key: Key) -> Resident[P] | None:
        resident = self.items.pop(key, None)
        if resident is not None:
            self.used -= resident.nbytes
        return resident

    def put(self, key: Key, resident: Resident[P]) -> list[Resident[P]]:
        """Insert (most recent) and return what no longer fits, least recent first."""
        self.pop(key)
        self.items[key] = resident
        self.used += resident.nbytes
        spilled = []
        while self.used > self.budget and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.used -= old.nbytes
            spilled.append(old)
        return spilled


class Residency(Generic[P]):
    """Resolve `name[@version]` to a validated, materialized, resident checkpoint version.

    `plan_type` is the plan the backbone's methods materialize into (`Plan` for CLIP,
    `AnswerPlan` for LLaVA); validation refuses other methods first, this makes it a type."""

    def __init__(
        self,
        store: ps.PromptStore,
        backbone: Backbone,
        plan_type: type[P],
        *,
        device_budget: int = 512 * 2**20,
        host_budget: int = 2 * 2**30,
        max_checkpoint_bytes: int = checkpoints.MAX_CHECKPOINT_BYTES,
        on_change: Callable[[str, int], None] | None = None,
    ) -> None:
        self.store, self.backbone = store, backbone
        self.max_checkpoint_bytes = max_checkpoint_bytes
        self.stats = ResidencyStats()
        self.on_change = on_change
        self.plan_type = plan_type
        self._device: _Tier[P] = _Tier(backbone.device, device_budget)
        self._host: _Tier[P] = _Tier(torch.device("cpu"), host_budget)
        self._current: dict[str, int] = {}  # the validated version we serve per name
        self._loading: dict[Key, Future[Resident[P]]] = {}
        self._deletions: dict[str, int] = {}  # per name: a load a deletion overtook is dropped
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.store_ok = True

    # --- requests ------------------------------------------------------------------------------
    def resolve(self, ref: str) -> Resident[P]:
        """The resident version for a request; loads it (once) if it is cold."""
        name, pinned = parse_ref(ref)
        version = pinned if pinned is not None else self._serving_version(name)
        return self._get((name, version))

    def resolve_hot(self, ref: str) -> Resident[P] | None:
        """`resolve` when it needs no work: the serving version known and its plan on the
        device. Never waits (None when the lock is busy or the plan is not there), so the event
        loop may call it; `resolve` on a thread does the rest. It spares the common request a
        thread hop, which cost more engine CPU than the lookup (bench/engine_cpu.py)."""
        name, pinned = parse_ref(ref)
        if not self._lock.acquire(blocking=False):
            return None
        try:
            version = pinned if pinned is not None else self._current.get(name)
            if version is None or (resident := self._device.items.get((name, version))) is None:
                return None
            self._device.items.move_to_end((name, version))
            self.stats.hits += 1
            return resident
        finally:
            self._lock.release()

    def current(self) -> dict[str, int]:
        """Name -> version currently served, for names this replica has served."""
        with self._lock:
            return dict(self._current)

    def _serving_version(self, name: str) -> int:
        with self._lock:
            version = self._current.get(name)
        if version is not None:
            return version  # kept fresh by the watcher: no store round trip per request
        with store_errors():
            version = self.store.current(name)
        if version is None:
            raise errors.NotFound(f"checkpoint {name!r} has no active version; activate one")
        with self._lock:
            # The watcher may have swapped in a newer version meanwhile: it wins.
            return self._current.setdefault(name, version)

    def _get(self, key: Key) -> Resident[P]:
        with self._lock:
            resident = self._device.items.get(key)
            if resident is not None:
                self._device.items.move_to_end(key)
                self.stats.hits += 1
                return resident
            resident = self._host.pop(key)
            if resident is not None:
                self.stats.hits += 1
                self._place(
                    key,
                    Resident(
                        resident.name,
                        resident.version,
                        resident.plan.to(self._device.device),
                        resident.manifest,
                    ),
                )
                return self._device.items[key]
            self.stats.misses += 1
            future = self._loading.get(key)
            owner = future is None
            if owner:
                future = self._loading[key] = Future()
            deletions = self._deletions.get(key[0], 0)
        assert future is not None
        if not owner:
            return future.result()  # single flight: wait for the one load
        try:
            resident = self._load(key)
            with self._lock:
                self._loading.pop(key, None)
                if self._deletions.get(key[0], 0) != deletions:
                    # deleted while it loaded (the bytes were read just before): never resident
                    raise errors.NotFound(f"checkpoint {key[0]!r} was deleted")
                self._place(key, resident)
        except BaseException as exc:
            future.set_exception(exc)
            with self._lock:
                self._loading.pop(key, None)
            raise
        future.set_result(resident)
        return resident

    def _place(self, key: Key, resident: Resident[P]) -> None:
        """Insert into the device tier; spill least-recent residents to host, then to the store."""
        for old in self._device.put(key, resident):
            self.stats.demotions += 1
            moved = Resident(old.name, old.version, old.plan.to("cpu"), old.manifest)
            self.stats.evictions += len(self._host.put((old.name, old.version), moved))

    def _load(self, key: Key) -> Resident[P]:
        name, version = key
        start = time.perf_counter()
        try:
            with store_errors():
                stored = self.store.get(name, version)
            ckpt = checkpoints.load(stored.data, self.backbone, self.max_checkpoint_bytes)
            plan = checkpoints.materialize(ckpt, self.backbone)
            if not isinstance(plan, self.plan_type):  # cannot happen past validation: say so
                raise errors.InvalidContent(
                    f"{ckpt.manifest.method} checkpoints cannot be served by this backbone"
                )
        except errors.PromptServeError:
            self.stats.load_failures += 1
            raise
        self.stats.loads += 1
        self.stats.load_seconds.append(time.perf_counter() - start)
        del self.stats.load_seconds[:-10_000]
        return Resident(name, version, plan, ckpt.manifest)

    # --- hot swap ------------------------------------------------------------------------------
    def start(self) -> None:
        """Follow the store's change events in a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="residency", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        sub: Any = None
        while not self._stop.is_set():
            try:
                if sub is None:
                    sub = self.store.watch()
                event = sub.next(timeout=0.2)
                self.store_ok = bool(getattr(sub, "connected", True))
                if event is not None:
                    self.apply(event)
            except ps.StoreUnavailable:
                self.store_ok = False
                self._stop.wait(0.5)
            except Exception:  # never let the watcher die: log and carry on
                log.exception("residency watcher error")
                self._stop.wait(0.5)
        if sub is not None:
            sub.close()

    def apply(self, event: ps.ChangeEvent) -> None:
        """Act on one store change: swap in a newly activated version of a name we serve, or
        forget every resident version of a deleted name (pinned `name@N` ones too)."""
        if event.kind == "delete":
            self.forget(event.name)
            return
        with self._lock:
            served = self._current.get(event.name)
        if served is None:
            return  # never served here: the next request asks the store
        if event.kind != "activate":
            return  # a put moves no pointer (an activating put is followed by "activate")
        with store_errors():
            pointer = self.store.current(event.name)
        if pointer is None or pointer == served:
            return
        try:
            self._get((event.name, pointer))  # load and validate before anyone can see it
        except errors.PromptServeError as exc:
            self.stats.swap_failures += 1
            log.error(
                "not swapping %s to version %s: %s (%s); still serving version %s",
                event.name,
                pointer,
                exc.message,
                exc.code,
                served,
            )
            return
        with self._lock:
            self._current[event.name] = pointer
            self.stats.swaps += 1
        log.info("swapped %s: version %s -> %s", event.name, served, pointer)
        if self.on_change is not None:
            self.on_change(event.name, pointer)

    def forget(self, name: str) -> None:
        """Drop every resident version of `name` (it was deleted): pinned requests included."""
        with self._lock:
            self._deletions[name] = self._deletions.get(name, 0) + 1
            self._current.pop(name, None)
            for tier in (self._device, self._host):
                for key in [k for k in tier.items if k[0] == name]:
                    tier.pop(key)

    # --- introspection -------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """What readiness reports: the store's state and what is resident."""
        with self._lock:
            return {
                "store": "ok" if self.store_ok else "degraded",
                "resident": len(self._device.items) + len(self._host.items),
                "device_bytes": self._device.used,
                "host_bytes": self._host.used,
            }

    def residents(self) -> dict[str, Any]:
        """What is in memory, most recently used first per tier, with each tier's budget."""
        with self._lock:
            tiers = {"device": self._device, "host": self._host}
            rows = [
                {"name": r.name, "version": r.version, "method": r.manifest.method, "tier": t,
                 "bytes": r.nbytes}
                for t, tier in tiers.items()
                for r in reversed(tier.items.values())
            ]  # fmt: skip
            return {
                "device": str(self._device.device),
                **{f"{t}_budget_bytes": tier.budget for t, tier in tiers.items()},
                **{f"{t}_bytes": tier.used for t, tier in tiers.items()},
                "residents": rows,
                "serving": dict(self._current),
            }
