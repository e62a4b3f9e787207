"""Which reference method wrote a Dassl state dict, decided from its whole key set.

Every method that can import Dassl files declares its `DasslLayout` (service/prompts/dassl.py, in
the method's own module): the keys it requires and trains, its buffers, and whether it saves a
frozen CLIP image tower of its own. A layout *explains* a key set when every key is one it
trains, one of its buffers or a frozen CLIP tensor, its required keys are there, and the frozen
tensors present do not contradict it. Exactly one method must explain the keys; when several do
(files with the frozen weights stripped, or a whole-model text-only file, which CoOp and
one-layer language-only IVLP would both write), the importer asks for `--method`, and a chosen
method that leaves a tensor unused is an error naming the tensor.
"""

from __future__ import annotations

from collections.abc import Iterable

from service.errors import ExtraTensor, InvalidCheckpoint, MalformedCheckpoint, MissingTensor
from service.prompts.dassl import ZS_PREFIX, DasslLayout, backbone_key
from service.prompts.registry import METHODS


def dassl_layouts() -> dict[str, DasslLayout]:
    """Method name -> its Dassl layout, for every registered method that declares one."""
    return {n: m.importer for n, m in METHODS.items() if isinstance(m.importer, DasslLayout)}


def layout(method: str) -> DasslLayout:
    """The Dassl layout of `method` (InvalidCheckpoint when it has none)."""
    found = dassl_layouts().get(method)
    if found is None:
        raise InvalidCheckpoint(f"no Dassl importer for method {method!r}")
    return found


def unexplained(method: str, keys: set[str]) -> tuple[list[str], list[str]]:
    """(keys `method` would leave unused, required keys it misses), both sorted."""
    lay = layout(method)
    p = lay.prefix(keys)
    required, used = lay.prompt_keys(keys, p)
    unused = []
    for k in keys - used - lay.buffers(p):
        frozen = backbone_key(k)
        if frozen is None or (k.startswith(ZS_PREFIX) and not lay.zero_shot_tower):
            unused.append(k)
    # trained tensors first: they are what a wrong method would drop
    unused.sort(key=lambda k: (backbone_key(k) is not None, k))
    return unused, [k for k in required if k not in keys]


def candidates(keys: set[str]) -> list[str]:
    """Every method that explains the key set."""
    return [
        m
        for m, lay in dassl_layouts().items()
        if not any(unexplained(m, keys)) and lay.frozen_ok(keys) is None
    ]


def _names(keys: list[str], limit: int = 4) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def choose_method(keys: Iterable[str], method: str | None = None) -> str:
    """The method that wrote these keys: `method` if it explains them, else the only candidate."""
    keys = set(keys)
    found = candidates(keys)
    if method is None:
        if len(found) == 1:
            return found[0]
        if found:
            raise InvalidCheckpoint(
                f"the tensors of this checkpoint could have been written by {' or '.join(found)}; "
                f"pass --method {' or --method '.join(found)}"
            )
        layouts = dassl_layouts()
        closest = min(layouts, key=lambda m: len(unexplained(m, keys)[0]))
        unused, _ = unexplained(closest, keys)
        titles = [lay.title for lay in layouts.values()]
        raise MalformedCheckpoint(
            f"unrecognized checkpoint layout: no {', '.join(titles[:-1])} or {titles[-1]} "
            f"prompt learner uses all of its tensors (e.g. {_names(unused or sorted(keys))})"
        )
    unused, missing = unexplained(method, keys)
    hint = f"; the tensors are those of {' or '.join(found)}" if found else ""
    if unused:
        raise ExtraTensor(f"{method} does not use tensor(s) {_names(unused)}{hint}")
    if missing:
        raise MissingTensor(f"{method} checkpoint lacks tensor(s) {_names(missing)}{hint}")
    if (why := layout(method).frozen_ok(keys)) is not None:
        raise InvalidCheckpoint(f"{why}{hint}")
    return method


def detect_method(keys: Iterable[str]) -> str:
    """Which reference method saved this state dict, from its whole key set."""
    return choose_method(keys)
