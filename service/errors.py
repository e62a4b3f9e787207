"""One error hierarchy and ONE table from error to HTTP status.

Every failure a user can cause or act on is a `PromptServeError` with a stable machine-readable
`code`; the HTTP layer never decides statuses on its own, it looks them up in `STATUS`.
"""

from __future__ import annotations


class PromptServeError(Exception):
    """Base of every error we raise on purpose; `code` is stable and documented."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(PromptServeError):
    code = "bad_request"


class Unauthorized(PromptServeError):
    code = "unauthorized"


class Forbidden(PromptServeError):
    code = "forbidden"


class NotFound(PromptServeError):
    code = "not_found"


class WrongBackbone(NotFound):
    """The route needs the other kind of backbone (classification: CLIP; answering: LLaVA)."""

    code = "wrong_backbone"


class Conflict(PromptServeError):
    code = "conflict"


class TooLarge(PromptServeError):
    code = "too_large"


class UnsupportedMedia(PromptServeError):
    code = "unsupported_media"


class InvalidContent(PromptServeError):
    code = "invalid_content"


class Overloaded(PromptServeError):
    code = "overloaded"


class NotReady(PromptServeError):
    code = "not_ready"


class StoreUnavailable(NotReady):
    code = "store_unavailable"


class DeadlineExceeded(PromptServeError):
    code = "deadline_exceeded"


# --- request content -----------------------------------------------------------------------------


class InvalidBase64(BadRequest):
    code = "invalid_base64"


class InvalidImage(InvalidContent):
    """Truncated, corrupt, or not decodable as the format its header claims."""

    code = "invalid_image"


class ImageTooLarge(TooLarge):
    """Too many bytes, or a header claiming more pixels than allowed (checked before decoding)."""

    code = "image_too_large"


class UnsupportedImageFormat(UnsupportedMedia):
    code = "unsupported_image_format"


class BodyTooLarge(TooLarge):
    code = "body_too_large"


class BodyTimeout(PromptServeError):
    """The client did not send its request body in time (slow or stalled upload)."""

    code = "body_timeout"


class TooManyImages(TooLarge):
    code = "too_many_images"


# --- the backbone --------------------------------------------------------------------------------


class BackboneError(PromptServeError):
    """The backbone cannot be built or its weights cannot be had."""

    code = "backbone_unavailable"


class WeightsUnavailable(BackboneError):
    code = "weights_unavailable"


# --- checkpoints: each validation failure is its own type, all 422 but size ----------------------


class InvalidCheckpoint(InvalidContent):
    code = "invalid_checkpoint"


class MalformedCheckpoint(InvalidCheckpoint):
    code = "malformed_checkpoint"


class UnknownMethod(InvalidCheckpoint):
    code = "unknown_method"


class InvalidConfig(InvalidCheckpoint):
    code = "invalid_method_config"


class MissingTensor(InvalidCheckpoint):
    code = "missing_tensor"


class ExtraTensor(InvalidCheckpoint):
    code = "extra_tensor"


class ShapeMismatch(InvalidCheckpoint):
    code = "shape_mismatch"


class DtypeMismatch(InvalidCheckpoint):
    code = "dtype_mismatch"


class NonFiniteTensor(InvalidCheckpoint):
    code = "non_finite_tensor"


class BackboneMismatch(InvalidCheckpoint):
    code = "backbone_mismatch"


class InvalidClassnames(InvalidCheckpoint):
    code = "invalid_classnames"


class CorruptCheckpoint(InvalidCheckpoint):
    """Stored bytes failed their checksum: the copy at rest is damaged."""

    code = "corrupt_checkpoint"


class CheckpointTooLarge(TooLarge):
    code = "checkpoint_too_large"


# The one table. Order matters: the first matching class (most specific first) wins.
STATUS: tuple[tuple[type[PromptServeError], int], ...] = (
    (CheckpointTooLarge, 413),
    (StoreUnavailable, 503),
    (InvalidContent, 422),
    (BadRequest, 400),
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (BodyTimeout, 408),
    (Conflict, 409),
    (TooLarge, 413),
    (UnsupportedMedia, 415),
    (Overloaded, 429),
    (NotReady, 503),
    (BackboneError, 503),
    (DeadlineExceeded, 504),
)


def status_of(error_class: type[PromptServeError]) -> int:
    """The HTTP status of an error class, from the one table (500 only for an unlisted class)."""
    for cls, status in STATUS:
        if issubclass(error_class, cls):
            return status
    return 500


def http_status(error: PromptServeError) -> int:
    """The HTTP status of an error, from the one table (500 only for a bug: an unlisted class)."""
    return status_of(type(error))
