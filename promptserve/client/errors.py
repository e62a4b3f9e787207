"""One exception hierarchy for everything the client raises.

An HTTP error becomes the `APIError` subclass of its status (the server's one table,
`service/errors.py`, decides statuses), carrying the API's machine-readable `code`, its
`message`, the `status` and the `Retry-After` it sent, if any. A transport failure (nothing
answered) is an `APIConnectionError`.
"""

from __future__ import annotations

from typing import Any

import httpx


class PromptServeClientError(Exception):
    """Base of every error the client raises."""


class APIConnectionError(PromptServeClientError):
    """The request did not get an HTTP answer (refused, reset, timed out)."""


class JobTimeout(PromptServeClientError, TimeoutError):
    """`jobs.wait` gave up: the job had not ended within its timeout."""


class APIError(PromptServeClientError):
    """An HTTP error answer: `status`, the API's `code` and `message`, `retry_after` (seconds)."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


class BadRequestError(APIError):
    """400."""


class AuthenticationError(APIError):
    """401: no key, or an unknown one."""


class PermissionDeniedError(APIError):
    """403: a read key asked for an admin action."""


class NotFoundError(APIError):
    """404."""


class ConflictError(APIError):
    """409: e.g. compare-and-set activation lost (the current version was not `expected`)."""


class PayloadTooLargeError(APIError):
    """413."""


class UnsupportedMediaError(APIError):
    """415."""


class UnprocessableError(APIError):
    """422: invalid content (a bad image, a checkpoint that fails validation, a bad field)."""


class OverloadedError(APIError):
    """429: retried by the client (honouring Retry-After) until its budget runs out."""


class InternalServerError(APIError):
    """500 (a server bug) and any status outside the table."""


class ServiceUnavailableError(APIError):
    """503: starting, stopping or store down; retried like 429."""


class DeadlineExceededError(APIError):
    """504: the request's deadline passed before it was computed."""


BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaError,
    422: UnprocessableError,
    429: OverloadedError,
    503: ServiceUnavailableError,
    504: DeadlineExceededError,
}


def retry_after(response: httpx.Response) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    from datetime import UTC, datetime

    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def from_response(response: httpx.Response) -> APIError:
    """The exception for an error response: `{"error": {"code", "message"}}` when the body
    has it (every promptserve error does), else the status and the start of the body."""
    code, message = "http_error", response.text[:500]
    try:
        body: Any = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            code = str(error.get("code", code))
            message = str(error.get("message", message))
    except ValueError:
        pass
    cls = BY_STATUS.get(response.status_code, InternalServerError)
    return cls(response.status_code, code, message, retry_after(response))
