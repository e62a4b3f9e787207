"""Fuzzing the HTTP API from its own OpenAPI document (schemathesis), shared by the bounded test
in `make test` and the longer run in bench/fuzz.py.

Each operation is driven with schema-valid ("positive") and schema-violating ("negative")
requests, in-process over ASGI. The checks: no 5xx ever; the status, content type, headers and
body are the documented ones; a schema-violating request is refused with a 4xx. Left out on
purpose: `positive_data_acceptance` (a schema-valid request must succeed): an image is a base64
string whose *content* the schema cannot express, so random valid-looking strings are rightly
refused with 400/422.
"""

from __future__ import annotations

import base64
import copy
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi import checks as oc

from service.app import create_app
from service.settings import Settings

ADMIN = "fuzz-admin-key"
READ = "fuzz-read-key"


def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 5xx, except a 503 the operation documents (not ready, store down, no LLaVA served)."""
    documented = str(response.status_code) in case.operation.definition.raw.get("responses", {})
    if response.status_code >= 500 and not (response.status_code == 503 and documented):
        raise AssertionError(f"server error {response.status_code}: {response.text[:500]}")
    return None


CHECKS = [
    no_server_error,
    oc.status_code_conformance,
    oc.content_type_conformance,
    oc.response_headers_conformance,
    oc.response_schema_conformance,
    oc.negative_data_rejection,
]
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
# (mode, document): valid requests; requests that violate the body or parameters; bad keys
VARIANTS = {
    "positive": (POSITIVE, False),
    "negative": (NEGATIVE, False),
    "bad-key": (NEGATIVE, True),
}


def fuzz_settings(store: str, **overrides: Any) -> Settings:
    """Keys on (so auth is part of what is fuzzed); small limits so big inputs hit them fast."""
    base: dict[str, Any] = {
        "store": store,
        "model": "tiny_clip",
        "pretrained": "none",
        "runtime": "torch",
        "api_keys": READ,
        "admin_keys": ADMIN,
        "max_body_bytes": 256 * 1024,
        "request_timeout_s": 10.0,
    }
    return Settings(**{**base, **overrides})


IMAGE_FORMAT = "promptserve-image"


def _images() -> st.SearchStrategy[str]:
    """Mostly real images (so requests get past decoding into the engine), some garbage."""
    real = []
    for fmt, size in (("PNG", (32, 32)), ("JPEG", (40, 24)), ("WEBP", (16, 16)), ("GIF", (8, 8))):
        buf = io.BytesIO()
        Image.new("RGB", size, (10, 200, 30)).save(buf, fmt)
        real.append(base64.b64encode(buf.getvalue()).decode())
    garbage = st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode())
    return st.one_of(st.sampled_from(real), garbage, st.text(max_size=20))


def load_schema(auth: bool = True) -> Any:
    """The OpenAPI document the service publishes (no lifespan is needed to build it).

    Two generation hints are added, not part of the documented contract: image strings carry a
    format whose strategy yields real images; and with `auth=False` the security scheme is
    dropped, so schema-violating cases negate bodies and parameters instead of the key (the
    runner always sends a valid key then; the `auth=True` document fuzzes the key itself).
    """
    app = create_app(fuzz_settings("file:///nonexistent-fuzz-store"))
    doc = copy.deepcopy(app.openapi())
    schemathesis.openapi.format(IMAGE_FORMAT, _images())
    for path in doc["paths"].values():
        for op in path.values():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            props = body.get("schema", {}).get("properties", {})
            if props.get("images", {}).get("items", {}).get("type") == "string":
                props["images"]["items"]["format"] = IMAGE_FORMAT
            if not auth:
                op.pop("security", None)
    if not auth:
        doc.get("components", {}).pop("securitySchemes", None)
    return schemathesis.openapi.from_dict(doc)


def plan() -> list[tuple[str, str, Any, Any]]:
    """(operation label, variant, operation, mode) for every operation and variant."""
    docs = {auth: load_schema(auth) for auth in (False, True)}
    out = []
    for variant, (mode, auth) in VARIANTS.items():
        for op in docs[auth].get_all_operations():
            operation = op.ok()
            if mode == NEGATIVE and not _has_inputs(operation):
                continue  # nothing to negate (healthz, metrics)
            if variant == "bad-key" and not operation.definition.raw.get("security"):
                continue  # open routes: no key to get wrong
            out.append((operation.label, variant, operation, mode))
    return out


def _has_inputs(operation: Any) -> bool:
    """Negative mode needs something to negate: a body, a parameter or a key."""
    raw = operation.definition.raw
    return any(raw.get(k) for k in ("requestBody", "parameters", "security"))


@dataclass
class Tally:
    """What one run did: requests by status, and the failures (check name, request, response)."""

    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    unsatisfiable: bool = False

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())


def fuzz_operation(
    app: Any, operation: Any, mode: Any, max_examples: int, tally: Tally, seed: int | None = None
) -> None:
    """Drive one operation with `max_examples` generated requests; record statuses and failures."""

    def run(case: Any) -> None:
        header_mode = case.meta.components.get(ParameterLocation.HEADER) if case.meta else None
        if header_mode is None or header_mode.mode == schemathesis.GenerationMode.POSITIVE:
            # a valid key, so the request reaches the handler; negated headers keep what
            # schemathesis made of them (missing or garbage keys must be refused)
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {ADMIN}"}
        response = case.call(app=app)
        tally.statuses[response.status_code] = tally.statuses.get(response.status_code, 0) + 1
        try:
            case.validate_response(response, checks=CHECKS)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # FailureGroup is a BaseExceptionGroup; collect them all
            tally.failures.append(f"{operation.label} [{mode.value}] {exc}"[:3000])

    test: Callable[..., None] = settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=seed is None,
        suppress_health_check=list(HealthCheck),
    )(given(operation.as_strategy(generation_mode=mode))(run))
    if seed is not None:
        from hypothesis import seed as hypothesis_seed

        test = hypothesis_seed(seed)(test)
    try:
        test()
    except Unsatisfiable:
        # e.g. a path parameter of type string: every value is schema-valid, none can be negated
        tally.unsatisfiable = True


def shutdown(app: Any) -> None:
    """End the lifespan schemathesis started for `app` (it keeps one per app otherwise)."""
    from schemathesis.python import asgi

    del app
    asgi.shutdown_lifespans()
