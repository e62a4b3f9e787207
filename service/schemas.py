"""Request and response models of the HTTP API (the contract in DESIGN.md, extended only)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

REF = Field(
    default=None, max_length=100, description="checkpoint name, or name@version to pin a version"
)


class ClassifyRequest(BaseModel):
    """Exactly one of `checkpoint`, `checkpoints`, `classnames` (ad-hoc zero-shot)."""

    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(description="base64 images (or data: URIs): JPEG, PNG or WebP")
    checkpoint: str | None = REF
    checkpoints: list[str] | None = Field(default=None, max_length=64)
    classnames: list[str] | None = Field(default=None, description="ad-hoc zero-shot classes")
    templates: list[str] | None = Field(default=None, description="templates with one {}")
    top_k: int = Field(default=5, ge=1, le=1000)


class Prediction(BaseModel):
    label: str
    score: float


class ClassifyResult(BaseModel):
    checkpoint: str | None = Field(description="name; null for ad-hoc zero-shot")
    version: int | None
    method: str
    predictions: list[list[Prediction]] = Field(description="one list per image, best first")


class ClassifyResponse(BaseModel):
    results: list[ClassifyResult]


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(default_factory=list, description="base64 images")
    texts: list[str] = Field(default_factory=list, max_length=256)
    checkpoint: str | None = Field(
        default=None, max_length=100, description="embed images under this checkpoint's prompts"
    )


class EmbedResponse(BaseModel):
    checkpoint: str | None
    version: int | None
    image_embeddings: list[list[float]]
    text_embeddings: list[list[float]]


class UploadResponse(BaseModel):
    name: str
    version: int
    method: str
    active: bool


class ActivateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)
    expected: int | None = Field(
        default=None, ge=0, description="compare-and-set: the version you believe is current"
    )


class ActivateResponse(BaseModel):
    name: str
    version: int
    active: bool = True


class VersionOut(BaseModel):
    version: int
    size: int
    sha256: str
    created_at: float
    active: bool
    meta: dict[str, Any]


class CheckpointOut(BaseModel):
    name: str
    version: int | None = Field(description="the active version")
    method: str | None = None
    classes: int | None = None


class CheckpointList(BaseModel):
    """One page of checkpoint names (every name when no `limit` was given)."""

    checkpoints: list[CheckpointOut]
    total: int = Field(description="names matching `q`, over all pages")
    offset: int = 0
    limit: int | None = None


class CheckpointDetail(CheckpointOut):
    versions: list[VersionOut]
    classnames: list[str] | None = None
    dropped: list[dict[str, Any]] | None = Field(
        default=None, description="trained tensors its import left out on purpose, and why"
    )
    conversation: dict[str, Any] | None = Field(
        default=None, description="the conversation template it was trained with (answering)"
    )


class VersionDetail(VersionOut):
    """One version with what its file says: the manifest and its trained tensors."""

    name: str
    manifest: dict[str, Any]
    tensors: dict[str, list[int]] = Field(description="parameter name -> shape")
    parameters: int = Field(description="trainable parameters stored (sum over tensors)")


class VersionList(BaseModel):
    name: str
    versions: list[VersionOut]


class DeleteResponse(BaseModel):
    name: str
    deleted: bool = True


class JobPoint(BaseModel):
    """One point of the live curves: the running loss and accuracy at an optimizer step."""

    epoch: int
    step: int | None = None
    loss: float
    acc: float


class JobProgress(BaseModel):
    """Where a running job is: epoch (1-based) of epochs, optimizer steps done of the total (the
    total and the ETA are known once the first epoch has ended), running loss and accuracy."""

    epoch: int
    epochs: int
    step: int | None = None
    steps: int | None = None
    loss: float
    acc: float
    eta_s: float | None = None


class JobResult(BaseModel):
    name: str
    version: int
    metrics: dict[str, Any]


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    """A training job; fields without a value are left out."""

    id: str
    state: Literal["queued", "started", "finished", "failed", "cancelled"]
    name: str | None = None
    method: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    progress: JobProgress | None = None
    history: list[JobPoint] | None = Field(
        default=None, description="progress so far, oldest first (bounded: thinned past 256)"
    )
    result: JobResult | None = None
    error: JobError | None = None
    cancel_requested: bool | None = None


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
