"""The one gate every checkpoint name passes before it becomes a path or a key."""

from __future__ import annotations

import re

from prompts_store.base import InvalidName

MAX_NAME_LENGTH = 64
# Starts with a letter or digit, so ".", "..", hidden files and "-flag" lookalikes are excluded;
# no "/", "\", ":" or NUL, so a name is always exactly one path component and one key segment.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(name: object) -> str:
    """Return `name` if it is a valid checkpoint name, else raise InvalidName."""
    if not isinstance(name, str):
        raise InvalidName(f"a checkpoint name must be a string, not {type(name).__name__}")
    if _NAME.fullmatch(name) is None:
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise InvalidName(
            f"invalid checkpoint name {shown!r}: use 1-{MAX_NAME_LENGTH} letters, digits, '-', "
            "'_' or '.', starting with a letter or digit"
        )
    return name


def check_version(version: object, *, allow_zero: bool = False) -> int:
    """Return `version` if it is a positive int (or 0 when allowed), else raise InvalidName."""
    low = 0 if allow_zero else 1
    if isinstance(version, bool) or not isinstance(version, int) or version < low:
        raise InvalidName(f"a version must be an integer >= {low}, not {version!r}")
    return version


def is_valid_name(name: str) -> bool:
    """True if `name` would pass check_name (used to skip foreign entries when listing)."""
    return _NAME.fullmatch(name) is not None
