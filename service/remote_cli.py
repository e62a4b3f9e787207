"""`promptserve classify --url URL IMAGE...`: the command line's way to ask a running service,
through the Python client (`promptserve.client`), so it gets the client's retries and errors.

    promptserve classify --url http://127.0.0.1:8000 --checkpoint eurosat photo.png
    promptserve classify --classnames "cat,dog" --top-k 1 --json a.png b.png

The key comes from `--api-key` or $PROMPTSERVE_API_KEY; the URL from `--url` or
$PROMPTSERVE_URL (default http://127.0.0.1:8000).
"""

from __future__ import annotations

import os
import sys

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import CliPositionalArg, CliToggleFlag

from service.settings import Settings


def _split(value: str | None, sep: str = ",") -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(sep) if v.strip()]


class Classify(BaseModel):
    """classify images with a running service (HTTP, through promptserve.client)"""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    images: CliPositionalArg[list[str]] = Field(description="image files (JPEG, PNG, WebP)")
    url: str | None = Field(None, description="the service (default $PROMPTSERVE_URL or :8000)")
    api_key: str | None = Field(None, description="read key (default $PROMPTSERVE_API_KEY)")
    checkpoint: str | None = Field(None, description="name or name@version")
    checkpoints: str | None = Field(None, description="several, comma-separated")
    classnames: str | None = Field(None, description="ad-hoc zero-shot classes, comma-separated")
    templates: str | None = Field(None, description="with --classnames: '|'-separated, with {}")
    top_k: int = 3
    as_json: CliToggleFlag[bool] = Field(False, alias="json", description="the API's JSON answer")

    def settings(self) -> Settings:
        """The local settings (only logging is read from them; the server has its own)."""
        return Settings()

    def run(self) -> int:
        """One request for all the images; prints each image's top-k per checkpoint."""
        from promptserve.client import Client, PromptServeClientError

        if sum(v is not None for v in (self.checkpoint, self.checkpoints, self.classnames)) != 1:
            print("error (bad_request): give exactly one of --checkpoint, --checkpoints, "
                  "--classnames", file=sys.stderr)  # fmt: skip
            return 2
        url = self.url or os.environ.get("PROMPTSERVE_URL", "http://127.0.0.1:8000")
        try:
            with Client(url, api_key=self.api_key) as client:
                answer = client.classify(
                    self.images,
                    checkpoint=self.checkpoint,
                    checkpoints=_split(self.checkpoints),
                    classnames=_split(self.classnames),
                    templates=_split(self.templates, "|"),
                    top_k=self.top_k,
                )
        except PromptServeClientError as exc:
            code = getattr(exc, "code", "connection")
            print(f"error ({code}): {getattr(exc, 'message', exc)}", file=sys.stderr)
            return 2
        except OSError as exc:  # an image file that cannot be read
            print(f"error (bad_request): {exc}", file=sys.stderr)
            return 2
        if self.as_json:
            print(answer.model_dump_json(indent=1))
            return 0
        for result in answer.results:
            source = f"{result.checkpoint} v{result.version}" if result.checkpoint else "zero-shot"
            for image, predictions in zip(self.images, result.predictions, strict=True):
                top = ", ".join(f"{p.label} {p.score:.2f}" for p in predictions)
                print(f"{image}  [{source}]  {top}")
        return 0
