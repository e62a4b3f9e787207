"""Store errors (prompts_store knows nothing of HTTP) translated into our one error table."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import prompts_store as ps
from service import errors


@contextmanager
def store_errors() -> Iterator[None]:
    """Run store calls, re-raising their failures as PromptServeErrors with the same message."""
    try:
        yield
    except ps.StoreUnavailable as exc:
        raise errors.StoreUnavailable(f"checkpoint store unavailable: {exc}") from exc
    except ps.InvalidName as exc:
        raise errors.BadRequest(str(exc)) from exc
    except ps.NotFound as exc:
        raise errors.NotFound(str(exc)) from exc
    except ps.Conflict as exc:
        raise errors.Conflict(str(exc)) from exc
    except ps.CorruptBlob as exc:
        raise errors.CorruptCheckpoint(str(exc)) from exc
    except ps.TooLarge as exc:
        raise errors.CheckpointTooLarge(str(exc)) from exc
    except ps.StoreError as exc:  # InvalidMeta and anything a backend adds later
        raise errors.BadRequest(str(exc)) from exc
