"""`promptserve classify --url URL IMAGE...`: the command line's way to ask a running service,
through the Python client (`promptserve.client`), so it gets the client's retries and errors.

    promptserve classify --url http://127.0.0.1:8000 --checkpoint eurosat photo.png
    promptserve classify --classnames "cat,dog" --top-k 1 --json a.png b.png

The key comes from `--api-key` or $PROMPTSERVE_API_KEY; the URL from `--url` or
$PROMPTSERVE_URL (default http://127.0.0.1:8000).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The `classify` subcommand on the main parser's subparsers."""
    c = sub.add_parser("classify", help="classify images with a running service (HTTP)")
    c.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP)")
    c.add_argument("--url", default=os.environ.get("PROMPTSERVE_URL", "http://127.0.0.1:8000"))
    c.add_argument("--api-key", help="read key (default $PROMPTSERVE_API_KEY)")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="name or name@version")
    what.add_argument("--checkpoints", help="several, comma-separated")
    what.add_argument("--classnames", help="ad-hoc zero-shot classes, comma-separated")
    c.add_argument("--templates", help="with --classnames: templates with {}, '|'-separated")
    c.add_argument("--top-k", type=int, default=3)
    c.add_argument("--json", action="store_true", help="print the API's JSON answer")
    c.set_defaults(func=cmd_classify)
    return c


def _split(value: str | None, sep: str = ",") -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(sep) if v.strip()]


def cmd_classify(args: argparse.Namespace) -> int:
    """One request for all the images; prints each image's top-k per checkpoint."""
    from promptserve.client import Client, PromptServeClientError

    try:
        with Client(args.url, api_key=args.api_key) as client:
            answer = client.classify(
                args.images,
                checkpoint=args.checkpoint,
                checkpoints=_split(args.checkpoints),
                classnames=_split(args.classnames),
                templates=_split(args.templates, "|"),
                top_k=args.top_k,
            )
    except PromptServeClientError as exc:
        code = getattr(exc, "code", "connection")
        print(f"error ({code}): {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # an image file that cannot be read
        print(f"error (bad_request): {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(answer.model_dump_json(indent=1))
        return 0
    for result in answer.results:
        source = f"{result.checkpoint} v{result.version}" if result.checkpoint else "zero-shot"
        for image, predictions in zip(args.images, result.predictions, strict=True):
            top = ", ".join(f"{p.label} {p.score:.2f}" for p in predictions)
            print(f"{image}  [{source}]  {top}")
    return 0
