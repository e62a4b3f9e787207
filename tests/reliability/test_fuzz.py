"""Bounded API fuzzing in `make test`: every operation of the OpenAPI document, schema-valid and
schema-violating requests, no 5xx, every response as documented (bench/fuzz.py runs it longer)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from prompts_store import open_store
from service.app import create_app
from service.checkpoints.publish import publish
from tests.engine.test_residency import checkpoint
from tests.reliability.fuzz import Tally, fuzz_operation, fuzz_settings, plan, shutdown

PLAN = {(label, variant): (op, mode) for label, variant, op, mode in plan()}
MAX_EXAMPLES = 12  # per operation and mode: ~15 s in all on 2 CPU cores


@pytest.fixture(scope="module")
def fuzz_app(backbone: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    url = f"file://{tmp_path_factory.mktemp('fuzz') / 'store'}"
    store = open_store(url)
    publish(store, backbone, checkpoint(backbone, name="eurosat"))  # something real to hit
    store.close()
    app = create_app(fuzz_settings(url), backbone=backbone)
    yield app
    shutdown(app)


def test_the_document_lists_every_route() -> None:
    expected = {
        "POST /v1/classify",
        "POST /v1/embed",
        "GET /v1/checkpoints",
        "POST /v1/checkpoints",
        "GET /v1/checkpoints/{name}",
        "DELETE /v1/checkpoints/{name}",
        "POST /v1/checkpoints/{name}/activate",
        "POST /v1/jobs",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
    }
    assert expected <= {label for label, _ in PLAN}
    assert ("POST /v1/classify", "bad-key") in PLAN and ("GET /healthz", "bad-key") not in PLAN


@pytest.mark.parametrize(("label", "variant"), sorted(PLAN))
def test_fuzz_operation(fuzz_app: Any, label: str, variant: str) -> None:
    tally = Tally()
    operation, mode = PLAN[label, variant]
    fuzz_operation(fuzz_app, operation, mode, MAX_EXAMPLES, tally)
    if tally.unsatisfiable and tally.requests == 0:
        pytest.skip("no schema-violating request exists for this operation")
    assert tally.requests > 0
    assert not tally.failures, "\n\n".join(tally.failures[:5])
    assert not any(status >= 500 and status != 503 for status in tally.statuses), tally.statuses
