"""JSON from clients, parsed within bounds: every failure is a 400 from the one error table.

The standard parser raises ValueError for broken text and RecursionError (not a ValueError) for
text nested past the interpreter's recursion limit; both are the client's doing. A document may
also parse and still be nested deeper than any request of ours needs, which only costs whoever
walks it later: `MAX_DEPTH` refuses it at once.
"""

from __future__ import annotations

from typing import Any

from service.errors import BadRequest

MAX_DEPTH = 32  # our deepest request (a job's recipe inside its spec) nests 4 levels


def loads(raw: str | bytes, what: str = "body", max_depth: int = MAX_DEPTH) -> Any:
    """Parse `raw` as JSON; BadRequest if it is not JSON or nests deeper than `max_depth`."""
    import json

    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply; at most {max_depth} levels") from None
    if depth(value, max_depth) > max_depth:
        raise BadRequest(f"{what} is nested too deeply; at most {max_depth} levels")
    return value


def depth(value: Any, stop: int = MAX_DEPTH) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), walked without recursion; stops
    counting once past `stop`."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            level += 1
            deepest = max(deepest, level)
            if deepest > stop:
                return deepest
            stack.extend((child, level) for child in item)
    return deepest
