"""The Python client of promptserve: `Client` (blocking) and `AsyncClient` (asyncio), on httpx.

    from promptserve.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        answer = client.classify(["photo.png"], checkpoint="eurosat", top_k=3)
        print(answer.results[0].predictions[0][0].label)

Results are the server's own response models (`service.schemas`), so client and server cannot
drift apart. Errors are `APIError` subclasses by status (`ConflictError`, `OverloadedError`, ...)
carrying the API's `code`; 429 and 503 are retried first, as `Retries` allows.
"""

from promptserve.client.aio import AsyncClient, AsyncJobs
from promptserve.client.calls import Retries
from promptserve.client.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    DeadlineExceededError,
    InternalServerError,
    JobTimeout,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PromptServeClientError,
    ServiceUnavailableError,
    UnprocessableError,
    UnsupportedMediaError,
)
from promptserve.client.sync import Client, Jobs
from service.schemas import (
    ActivateResponse,
    CheckpointDetail,
    CheckpointList,
    ClassifyResponse,
    ClassifyResult,
    DeleteResponse,
    EmbedResponse,
    JobOut,
    Prediction,
    UploadResponse,
    VersionList,
    VersionOut,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "ActivateResponse",
    "AsyncClient",
    "AsyncJobs",
    "AuthenticationError",
    "BadRequestError",
    "CheckpointDetail",
    "CheckpointList",
    "ClassifyResponse",
    "ClassifyResult",
    "Client",
    "ConflictError",
    "DeadlineExceededError",
    "DeleteResponse",
    "EmbedResponse",
    "InternalServerError",
    "JobOut",
    "JobTimeout",
    "Jobs",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Prediction",
    "PromptServeClientError",
    "Retries",
    "ServiceUnavailableError",
    "UnprocessableError",
    "UnsupportedMediaError",
    "UploadResponse",
    "VersionList",
    "VersionOut",
]
