"""One Settings class: every knob, from PROMPTSERVE_* variables (CLI flags override them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

LOOPBACK = ("127.0.0.1", "::1", "localhost")


class Settings(BaseSettings):
    """Validated once at start and never mutated afterwards."""

    model_config = SettingsConfigDict(env_prefix="PROMPTSERVE_", frozen=True, extra="forbid")

    # the backbone
    backbone: Literal["clip", "llava"] = Field(
        default="clip",
        description="clip: classification (open_clip); llava: instruction answering with M²PT",
    )
    model: str = Field(
        default="ViT-B-32",
        description="open_clip architecture name; with backbone=llava a hub id or directory",
    )
    pretrained: str = Field(
        default="openai", description="open_clip pretrained tag, a weights file, or 'none'"
    )
    model_config_path: str | None = Field(
        default=None, description="ARCH.json registering a custom open_clip architecture"
    )
    device: str = Field(default="cpu", description="torch device, e.g. cpu or cuda:0")
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    cache_dir: str | None = Field(default=None, description="where pretrained tags download to")
    # the fast path
    runtime: Literal["auto", "torch", "onnx", "cudagraph"] = Field(
        default="auto",
        description="auto: CUDA graphs on a GPU, eager torch on the CPU (measured; see docs)",
    )
    onnx_cache_dir: str = Field(default="var/onnx", description="exported graphs, reused")
    onnx_threads: int | None = Field(default=None, ge=1, description="default: all cores")
    onnx_int8: bool = Field(default=False, description="int8 dynamic quantization (CPU)")
    image_decode: Literal["auto", "cpu", "gpu"] = Field(
        default="auto",
        description="auto: nvJPEG + resize on the GPU when the backbone is on CUDA, else cpu "
        "(PIL + open_clip's transform, the reference path); non-JPEG images always take cpu",
    )
    jpeg_draft: bool = Field(
        default=False,
        description="decode JPEGs at a reduced DCT scale (faster; not the reference preprocessing)",
    )
    # the store and residency
    store: str = Field(default="file://var/store", description="file://DIR or redis://HOST:PORT/DB")
    # a 7B output head in bf16 is 250 MiB (M²PT checkpoints carry one)
    max_checkpoint_bytes: int = Field(default=320 * 2**20, ge=1024)
    # training jobs (run by `promptserve worker`)
    queue: str | None = Field(
        default=None,
        description="redis://HOST:PORT/DB for training jobs (default: the store's, if redis://)",
    )
    job_retries: int = Field(default=0, ge=0, le=10, description="retries of a failed job")
    job_timeout_s: int = Field(default=24 * 3600, ge=60, description="longest a job may run")
    local_jobs: bool = Field(
        default=True,
        description="with no Redis queue, the service runs training jobs in a child process",
    )
    runs_dir: str | None = Field(
        default="var/runs", description="where runs keep their curves (PNG) and run.json"
    )
    device_budget_mib: int = Field(default=512, ge=1, description="resident plans on the device")
    host_budget_mib: int = Field(default=2048, ge=0, description="resident plans in host memory")
    # the web console at /ui
    examples_dir: str | None = Field(
        default=None,
        description="images the console offers to try (PNG/JPEG/WebP); an optional labels.json "
        "in it maps file name -> true label",
    )
    # the HTTP server
    host: str = Field(default="127.0.0.1", description="address to bind")
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: str = Field(default="", description="comma-separated read keys")
    admin_keys: str = Field(default="", description="comma-separated admin keys")
    allow_insecure: bool = Field(
        default=False, description="allow binding a non-loopback address with no API keys"
    )
    shutdown_timeout_s: float = Field(default=30.0, ge=0, description="drain time on SIGTERM")
    frontends: int | Literal["auto"] = Field(
        default="auto",
        description="HTTP front-end processes beside one engine process: a number (1: one "
        "process does everything), or auto (the cores left beside the engine on a GPU, at most "
        "12; 1 on a CPU device, for LLaVA, and with in-process training jobs)",
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="408 and close when a request head takes longer"
    )
    body_timeout_s: float = Field(
        default=60.0, gt=0, description="408 when a request body takes longer in all"
    )
    body_idle_timeout_s: float = Field(
        default=10.0, gt=0, description="408 when a request body stalls this long"
    )
    metrics_public: bool = Field(
        default=False,
        description="serve /metrics and /readyz's details without a key (a private scrape network)",
    )
    # logs (service/logs.py)
    log_format: Literal["json", "text"] = Field(
        default="text", description="json: one object per line with the request id"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # batching and limits
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    max_wait_ms: float = Field(default=5.0, ge=0, le=1000)
    max_queue: int = Field(default=256, ge=1, description="queued requests before 429")
    max_queue_wait_s: float = Field(
        default=5.0, ge=0, description="429 when the work ahead would take longer (0: off)"
    )
    request_timeout_s: float = Field(default=30.0, gt=0, description="deadline per request")
    max_body_bytes: int = Field(default=64 * 2**20, ge=1024)
    max_images: int = Field(default=64, ge=1, description="images per request")
    max_image_bytes: int = Field(default=10 * 2**20, ge=1024)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    max_request_pixels: int = Field(
        default=100_000_000, ge=1, description="decoded pixels per request, from the headers"
    )
    max_decode_pixels: int = Field(
        default=200_000_000,
        ge=1,
        description="decoded pixels in flight in this process (429 beyond): bounds decode memory",
    )
    max_adhoc_classes: int = Field(default=1000, ge=1, description="ad-hoc zero-shot classes")
    max_adhoc_texts: int = Field(
        default=60_000,
        ge=1,
        description="ad-hoc prompts (classes x templates) being encoded at once (429 beyond)",
    )
    zeroshot_cache_entries: int = Field(default=256, ge=1)
    # generation (backbone=llava)
    max_new_tokens: int = Field(default=256, ge=1, le=8192, description="default and cap")
    gen_max_batch_size: int = Field(
        default=8, ge=1, le=256, description="rows per decode batch (continuous: KV slots)"
    )
    generation: Literal["continuous", "static"] = Field(
        default="continuous",
        description="continuous: requests join and leave the running batch at every step; "
        "static: a batch runs until its last row ends (the baseline, for comparison)",
    )
    gen_max_len: int = Field(
        default=0, ge=0, description="positions per KV slot (0: the model's maximum)"
    )
    gen_step_tokens: int = Field(
        default=512, ge=2, description="tokens per step (decode rows + prefill chunks)"
    )

    def read_keys(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())

    def admin_key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.admin_keys.split(",") if k.strip())

    @property
    def auth_enabled(self) -> bool:
        return bool(self.read_keys() or self.admin_key_set())
