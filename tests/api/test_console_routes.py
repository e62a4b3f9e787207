"""What the console needs from the API, which any client may use too: paged and searched
checkpoint lists (cheap with many names), one version's manifest, the caller's role, residency;
and the console's own files, served with their security headers."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.api.conftest import ADMIN, READ, b64, png


def names(client, **params) -> dict:
    r = client.get("/v1/checkpoints", params=params)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(params=["file", "redis"])
def store_client(request, make_client, backbone) -> Iterator[TestClient]:
    """A client on each store backend: the paging is the route's, the names come from the store."""
    if request.param == "file":
        yield make_client()
        return
    url = request.getfixturevalue("redis_url")
    settings = Settings(store=url, model="tiny_clip", pretrained="none", runtime="torch")
    with TestClient(create_app(settings, backbone=backbone)) as client:
        yield client


def test_search_and_pages(store_client, upload):
    for name in ("alpha", "beta", "Gamma-1", "gamma-2", "delta"):
        assert upload(store_client, name).status_code == 201
    everything = names(store_client)
    assert [c["name"] for c in everything["checkpoints"]] == sorted(
        ["alpha", "beta", "Gamma-1", "gamma-2", "delta"]
    )
    assert everything["total"] == 5 and everything["limit"] is None  # unpaged: as before
    page = names(store_client, limit=2, offset=1)
    assert [c["name"] for c in page["checkpoints"]] == ["alpha", "beta"]
    assert (page["total"], page["offset"], page["limit"]) == (5, 1, 2)
    found = names(store_client, q="GAMMA")  # case-insensitive substring of the name
    assert [c["name"] for c in found["checkpoints"]] == ["Gamma-1", "gamma-2"]
    assert found["checkpoints"][0]["version"] == 1 and found["checkpoints"][0]["method"] == "coop"
    assert names(store_client, q="gamma", limit=1, offset=1)["checkpoints"][0]["name"] == "gamma-2"
    assert names(store_client, q="nothing")["total"] == 0
    assert names(store_client, offset=99, limit=5) == {
        "checkpoints": [], "total": 5, "offset": 99, "limit": 5,
    }  # fmt: skip


@pytest.mark.parametrize(
    "params", [{"limit": 0}, {"limit": 1001}, {"offset": -1}, {"q": "x" * 65}, {"limit": "many"}]
)
def test_bad_paging_is_a_422(client, params):
    r = client.get("/v1/checkpoints", params=params)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_a_page_reads_only_its_own_checkpoints(client, upload, monkeypatch):
    """With 10,000 names the cost must be the page's, not the store's: count the per-name reads."""
    for i in range(30):
        assert upload(client, f"ckpt-{i:03d}").status_code == 201
    store = client.app.state.store
    calls: list[str] = []
    real = store.versions

    def counted(name: str):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(store, "versions", counted)
    page = names(client, limit=5, offset=10)
    assert [c["name"] for c in page["checkpoints"]] == [f"ckpt-{i:03d}" for i in range(10, 15)]
    assert sorted(calls) == [f"ckpt-{i:03d}" for i in range(10, 15)]


def test_version_detail_has_the_manifest_and_parameter_count(client, upload, backbone):
    upload(client, "pets", seed=1)
    upload(client, "pets", seed=2)
    r = client.get("/v1/checkpoints/pets/versions/1")
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["name"] == "pets" and d["version"] == 1 and d["active"] is False
    assert d["manifest"]["method"] == "coop" and d["manifest"]["name"] == "pets"
    assert d["manifest"]["backbone"]["fingerprint"] == backbone.fingerprint
    n_ctx, width = 4, backbone.text_width
    assert d["tensors"] == {"ctx": [n_ctx, width]} and d["parameters"] == n_ctx * width
    assert client.get("/v1/checkpoints/pets/versions/2").json()["active"] is True
    missing = client.get("/v1/checkpoints/pets/versions/7")
    assert missing.status_code == 404 and "versions 1-2" in missing.json()["error"]["message"]
    assert client.get("/v1/checkpoints/pets/versions/0").status_code == 422
    assert client.get("/v1/checkpoints/nobody/versions/1").status_code == 404


def test_whoami(make_client):
    open_client = make_client()
    assert open_client.get("/v1/whoami").json() == {"role": "admin", "auth": False}
    keyed = make_client(api_keys=READ, admin_keys=ADMIN)
    assert keyed.get("/v1/whoami").status_code == 401
    bad = keyed.get("/v1/whoami", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"]["message"] == "unknown API key"
    for key, role in ((READ, "read"), (ADMIN, "admin")):
        r = keyed.get("/v1/whoami", headers={"Authorization": f"Bearer {key}"})
        assert r.json() == {"role": role, "auth": True}


def test_residency_lists_what_is_in_memory(client, upload):
    assert client.get("/v1/residency").json()["residents"] == []
    upload(client, "warm")
    r = client.post("/v1/classify", json={"checkpoint": "warm", "images": [b64(png())]})
    assert r.status_code == 200
    res = client.get("/v1/residency").json()
    assert [(x["name"], x["version"], x["method"]) for x in res["residents"]] == [
        ("warm", 1, "coop")
    ]
    assert res["serving"] == {"warm": 1} and res["device"] == "cpu"
    assert res["device_bytes"] == sum(x["bytes"] for x in res["residents"] if x["tier"] == "device")
    assert res["device_budget_bytes"] == 512 * 2**20


def test_root_leads_to_the_console_served_with_security_headers(client):
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="js/main.js">' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    js = client.get("/ui/js/main.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "content-security-policy" in js.headers
    missing = client.get("/ui/js/nothing.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert "/ui" not in client.get("/openapi.json").json()["paths"]  # not part of the API


def test_examples_are_listed_and_only_they_are_served(make_client, tmp_path):
    folder = tmp_path / "examples"
    folder.mkdir()
    (folder / "b.png").write_bytes(png(color=(0, 0, 255)))
    (folder / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg, served as it is")
    (folder / "c.webp").write_bytes(b"RIFF")
    (folder / "notes.txt").write_text("not an image")
    # both shapes of entry: a plain label, or the demo's {"label", "domain", ...}
    labels = {
        "b.png": "blue square", "a.jpg": 3, "c.webp": {"label": "red circle", "domain": "dusk"},
    }  # fmt: skip
    (folder / "labels.json").write_text(json.dumps(labels))
    (tmp_path / "secret.png").write_bytes(png())
    client = make_client(examples_dir=str(folder))
    listed = client.get("/ui/examples.json").json()["examples"]
    assert listed == [
        {"file": "a.jpg", "url": "/ui/examples/a.jpg", "label": None, "group": None},
        {"file": "b.png", "url": "/ui/examples/b.png", "label": "blue square", "group": None},
        {"file": "c.webp", "url": "/ui/examples/c.webp", "label": "red circle", "group": "dusk"},
    ]
    r = client.get("/ui/examples/b.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == (folder / "b.png").read_bytes()
    for path in ("notes.txt", "labels.json", "..%2Fsecret.png", "%2E%2E/secret.png"):
        assert client.get(f"/ui/examples/{path}").status_code == 404, path
    assert make_client().get("/ui/examples.json").json() == {"examples": []}


def test_examples_need_a_read_key_when_auth_is_on(make_client, tmp_path):
    folder = tmp_path / "examples"
    folder.mkdir()
    (folder / "b.png").write_bytes(png())
    (folder / "index.json").write_text(json.dumps({"b.png": "blue square"}))  # the other name
    client = make_client(examples_dir=str(folder), api_keys=READ, admin_keys=ADMIN)
    for path in ("/ui/examples.json", "/ui/examples/b.png"):
        assert client.get(path).status_code == 401, path
    read = {"Authorization": f"Bearer {READ}"}
    assert client.get("/ui/examples.json", headers=read).json()["examples"][0]["label"] == (
        "blue square"
    )
    assert client.get("/ui/examples/b.png", headers=read).content == (folder / "b.png").read_bytes()
    assert client.get("/ui/").status_code == 200  # the page itself holds no data


def test_training_options_name_what_a_job_may_use(client):
    from service.prompts.registry import METHODS
    from service.training import proving_ground as pg

    r = client.get("/v1/training/options")
    assert r.status_code == 200, r.text
    opts = r.json()
    # every method a CLIP backbone trains is offered: not plain zero-shot (nothing to train),
    # not the instruction-answering ones (another backbone), nor their dataset kind
    assert opts["methods"] == sorted(set(METHODS) - {"zeroshot", "m2pt"})
    assert "proving_ground" in opts["datasets"] and "image_folder" in opts["datasets"]
    assert "llava_json" not in opts["datasets"]
    assert opts["proving_ground"]["domains"] == list(pg.DOMAINS)
    assert opts["proving_ground"]["recipe"]["epochs"] >= 1
