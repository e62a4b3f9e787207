"""Serving the console: `/` and `/ui` lead to it, its files come from `static/`, and the example
images an operator configured (`PROMPTSERVE_EXAMPLES_DIR`, the demo sets it) are listed for it,
read-only, with the true labels its labels.json gives.

The console is plain files: no build step, no CDN, nothing fetched from elsewhere. Its pages are
public (they hold no data); everything they show comes from the API with the user's key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from service import errors
from service.api.deps import ReadAuth, SettingsDep

STATIC = Path(__file__).resolve().parent / "static"
IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                  ".webp": "image/webp"}  # fmt: skip
MAX_EXAMPLES = 64

# The API key lives in sessionStorage, so script injection is what would steal it: only our own
# files may run, and the page talks to this origin only.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag): an upgraded server never serves stale JS
}


class ConsoleFiles(StaticFiles):
    """StaticFiles with the console's security headers on every answer."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


LABEL_FILES = ("labels.json", "index.json")  # the demo writes the first; either is read


def _truths(root: Path) -> dict[str, Any]:
    """file name -> its entry in labels.json (or index.json): a label, or {"label", "domain"}."""
    for name in LABEL_FILES:
        try:
            loaded = json.loads((root / name).read_text())
        except (OSError, ValueError):
            continue  # labels are optional: the images still show, without their truth
        if isinstance(loaded, dict):
            return loaded
    return {}


def _text(value: Any) -> str | None:
    return value[:200] if isinstance(value, str) else None


def examples(folder: str | None) -> list[dict[str, Any]]:
    """The example images in `folder` (sorted, bounded), each with its true label and its group
    (the demo's domain) when the folder's labels.json says them."""
    if not folder or not Path(folder).is_dir():
        return []
    root = Path(folder)
    truths = _truths(root)
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    out = []
    for p in files[:MAX_EXAMPLES]:
        entry = truths.get(p.name)
        meta = entry if isinstance(entry, dict) else {"label": entry}
        out.append(
            {
                "file": p.name,
                "url": f"/ui/examples/{p.name}",
                "label": _text(meta.get("label")),
                "group": _text(meta.get("domain", meta.get("group"))),
            }
        )
    return out


router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui")
async def ui() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


# The examples are the operator's files: they need a read key like everything else that holds
# data (the console fetches them with its Bearer header).
@router.get("/ui/examples.json")
async def example_list(_: ReadAuth, settings: SettingsDep) -> dict[str, Any]:
    return {"examples": examples(settings.examples_dir)}


@router.get("/ui/examples/{file}")
async def example(file: str, _: ReadAuth, settings: SettingsDep) -> FileResponse:
    # Only names the listing offers: no path from the URL ever reaches the filesystem.
    match = next((e for e in examples(settings.examples_dir) if e["file"] == file), None)
    if match is None or settings.examples_dir is None:
        raise errors.NotFound(f"no example image {file[:80]!r}")
    path = Path(settings.examples_dir) / match["file"]
    return FileResponse(path, media_type=IMAGE_SUFFIXES[path.suffix.lower()])


def install(app: FastAPI) -> None:
    """Add the console to `app`: its routes first, then its files at /ui/."""
    app.include_router(router)
    app.mount("/ui", ConsoleFiles(directory=STATIC, html=True), name="console")
