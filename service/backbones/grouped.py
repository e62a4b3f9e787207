"""Per-row projectors and output heads: rows are grouped by the tensor they use.

An M²PT checkpoint may carry its own projector and output head (the reference trains both), so
one batch can hold rows of several checkpoints with different weights. Each distinct tensor is
applied once, to the rows that use it (one matrix product per group, never a per-row gathered
copy of a 32000x4096 head); rows on the base's weights form one group with the base's module.
The cost is one extra product, and one more read of a head's bytes, per distinct head in the
batch: bench/llava.py --heads measures it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

W = TypeVar("W")


def groups(per_row: Sequence[W | None], rows: int) -> list[tuple[W | None, list[int]]]:
    """(weights, row indices) per distinct object (by identity), in first-use order; an empty
    `per_row` means every row uses the base's (None)."""
    if not per_row:
        return [(None, list(range(rows)))]
    if len(per_row) != rows:
        raise ValueError(f"{len(per_row)} per-row weights for {rows} rows")
    out: dict[int, tuple[W | None, list[int]]] = {}
    for i, w in enumerate(per_row):
        out.setdefault(id(w), (w, []))[1].append(i)
    return list(out.values())


def apply(
    x: Tensor,
    per_row: Sequence[W | None],
    fn: Callable[[Tensor, W | None], Tensor],
) -> Tensor:
    """`fn(x[rows], weights)` for each group, assembled in row order (dim 0)."""
    parts = groups(per_row, x.shape[0])
    if len(parts) == 1:  # the common case: one checkpoint (or the base) for the whole batch
        return fn(x, parts[0][0])
    outs = [(rows, fn(x[rows], w)) for w, rows in parts]
    first = outs[0][1]
    out = first.new_empty((x.shape[0], *first.shape[1:]))
    for rows, y in outs:
        out[torch.tensor(rows, device=x.device)] = y
    return out


def head_logits(hidden: Tensor, heads: Sequence[Tensor | None], base: Tensor) -> Tensor:
    """Logits of `hidden` `[B, ..., d]` under each row's head `[V, d]` (None: `base`)."""
    return apply(hidden, heads, lambda h, w: F.linear(h, base if w is None else w))
