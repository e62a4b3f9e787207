"""The curve points a training job keeps for its readers (GET /v1/jobs/{id} `history`).

Both job runners (Redis/RQ and the embedded child process) append every progress row here, so a
console can draw live loss and accuracy curves from one status read. The list is bounded: past
`MAX_POINTS`, the point whose neighbours are closest together is dropped (never the first or the
latest), so the points stay spread evenly over the whole run, however long, in a few kilobytes.
"""

from __future__ import annotations

from typing import Any

HISTORY_KEYS = ("epoch", "step", "loss", "acc")
MAX_POINTS = 256


def extend(
    history: list[dict[str, Any]] | None, row: dict[str, Any], limit: int = MAX_POINTS
) -> list[dict[str, Any]]:
    """`history` (a new list when None) with the row's point appended, thinned past `limit`."""
    points = history if history is not None else []
    points.append({k: row[k] for k in HISTORY_KEYS if row.get(k) is not None})
    if len(points) > limit:
        where = [p.get("step", p.get("epoch", 0)) for p in points]
        densest = min(range(1, len(points) - 1), key=lambda i: where[i + 1] - where[i - 1])
        del points[densest]
    return points
