"""Bearer keys: read keys classify and list; admin keys also upload, activate and delete."""

from __future__ import annotations

import pytest

from service.cli import main
from tests.api.conftest import ADMIN, READ, b64, png, store_state

READ_H = {"Authorization": f"Bearer {READ}"}
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture
def secured(make_client):
    return make_client(api_keys=READ, admin_keys=ADMIN)


def test_no_key_or_wrong_key_is_401(secured):
    for headers in (
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer"},
    ):
        r = secured.get("/v1/checkpoints", headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"


def test_read_key_reads_but_cannot_administer(secured, upload):
    assert upload(secured, headers=ADMIN_H).status_code == 201
    before = store_state(secured)
    assert secured.get("/v1/checkpoints", headers=READ_H).status_code == 200
    r = secured.post(
        "/v1/classify", headers=READ_H, json={"checkpoint": "eurosat", "images": [b64(png())]}
    )
    assert r.status_code == 200
    for method, path, kw in (
        ("post", "/v1/checkpoints/eurosat/activate", {"json": {"version": 1}}),
        ("delete", "/v1/checkpoints/eurosat", {}),
    ):
        r = getattr(secured, method)(path, headers=READ_H, **kw)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = getattr(secured, method)(path, **kw)
        assert r.status_code == 401
    assert upload(secured, headers=READ_H).status_code == 403
    assert upload(secured).status_code == 401
    assert store_state(secured) == before


def test_admin_key_does_everything(secured, upload):
    assert upload(secured, headers=ADMIN_H).status_code == 201
    assert secured.get("/v1/checkpoints", headers=ADMIN_H).status_code == 200
    r = secured.post("/v1/checkpoints/eurosat/activate", headers=ADMIN_H, json={"version": 1})
    assert r.status_code == 200
    assert secured.delete("/v1/checkpoints/eurosat", headers=ADMIN_H).status_code == 200


def test_probes_need_no_key_but_details_and_metrics_do(secured, upload):
    """Without a key: liveness, and readiness as a status code with nothing else (no weights
    path, fingerprint or store); /metrics (which names routes, error codes, residency) is a 401."""
    assert upload(secured, headers=ADMIN_H).status_code == 201
    assert secured.get("/healthz").status_code == 200
    anonymous = secured.get("/readyz")
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ready"}
    detailed = secured.get("/readyz", headers=READ_H).json()
    assert {"backbone", "fingerprint", "runtime", "store"} <= set(detailed)
    r = secured.get("/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert secured.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    text = secured.get("/metrics", headers=READ_H).text
    assert "promptserve_request_seconds" in text and "eurosat" not in text


def test_metrics_can_be_made_public_for_a_private_scrape_network(make_client):
    public = make_client(api_keys=READ, admin_keys=ADMIN, metrics_public=True)
    assert public.get("/metrics").status_code == 200
    assert "fingerprint" in public.get("/readyz").json()
    assert public.get("/v1/checkpoints").status_code == 401  # the API itself is unchanged


def test_no_keys_means_loopback_only(capsys):
    code = main(["serve", "--host", "0.0.0.0", "--pretrained", "none"])
    assert code == 2
    err = capsys.readouterr().err
    assert "loopback only" in err and "--allow-insecure" in err and "PROMPTSERVE_API_KEYS" in err
