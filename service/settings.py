"""One Settings class: every knob, from PROMPTSERVE_* variables (CLI flags override them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Validated once at start and never mutated afterwards."""

    model_config = SettingsConfigDict(env_prefix="PROMPTSERVE_", frozen=True, extra="forbid")

    model: str = Field(default="ViT-B-32", description="open_clip architecture name")
    pretrained: str = Field(
        default="openai", description="open_clip pretrained tag, a weights file, or 'none'"
    )
    model_config_path: str | None = Field(
        default=None, description="ARCH.json registering a custom open_clip architecture"
    )
    device: str = Field(default="cpu", description="torch device, e.g. cpu or cuda:0")
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    cache_dir: str | None = Field(default=None, description="where pretrained tags download to")
    store: str = Field(default="file://var/store", description="file://DIR or redis://HOST:PORT/DB")
    max_checkpoint_bytes: int = Field(default=256 * 2**20, ge=1024)
