"""Checkpoint management on a LLaVA server, and routes of the other backbone kind answering a
clear 404 `wrong_backbone` (never the misleading 503 "starting")."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.backbones.clip import ClipBackbone
from service.backbones.llava import LlavaBackbone
from service.checkpoints import BackboneRef, Manifest, dump
from service.prompts.m2pt import M2PT
from service.settings import Settings
from tests.llava.conftest import data_uri, m2pt_blob

ADMIN = {"Authorization": "Bearer admin-key"}
READ = {"Authorization": "Bearer read-key"}
ASK = {"image": data_uri((255, 0, 0)), "instruction": "what is in the image?"}
CHAT = {"model": "plain", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def serve(bb: object, tmp_path: Path, **kw: object) -> TestClient:
    settings = Settings(
        store=f"file://{tmp_path / 'store'}",
        api_keys="read-key",
        admin_keys="admin-key",
        runtime="torch",
        **kw,  # type: ignore[arg-type]
    )
    return TestClient(create_app(settings, backbone=bb))  # type: ignore[arg-type]


@pytest.fixture
def llava_client(llava: LlavaBackbone, tmp_path: Path) -> Iterator[TestClient]:
    with serve(llava, tmp_path, backbone="llava") as client:
        yield client


def upload(client: TestClient, blob: bytes) -> object:
    files = {"file": ("c.safetensors", blob, "application/octet-stream")}
    return client.post("/v1/checkpoints", files=files, headers=ADMIN)


def answer(client: TestClient, checkpoint: str | None) -> object:
    body = {**ASK, "checkpoint": checkpoint, "max_new_tokens": 8}
    return client.post("/v1/answer", json=body, headers=READ)


def served(client: TestClient, checkpoint: str, version: int) -> dict[str, object]:
    """The answer once the watcher has swapped `version` in (hot swap is asynchronous)."""
    deadline = time.monotonic() + 10
    while True:
        out: dict[str, object] = answer(client, checkpoint).json()  # type: ignore[attr-defined]
        if out["version"] == version or time.monotonic() > deadline:
            return out
        time.sleep(0.05)


def test_upload_list_show_activate_delete_on_llava(
    llava_client: TestClient, llava: LlavaBackbone
) -> None:
    c = llava_client
    r = upload(c, m2pt_blob(llava, name="up", seed=4))
    assert r.status_code == 201, r.text  # type: ignore[attr-defined]
    assert r.json() == {"name": "up", "version": 1, "method": "m2pt", "active": True}  # type: ignore[attr-defined]
    plain = answer(c, None).json()["answer"]  # type: ignore[attr-defined]
    v1 = answer(c, "up").json()  # type: ignore[attr-defined]
    assert v1["version"] == 1 and v1["answer"] != plain
    assert upload(c, m2pt_blob(llava, name="up", seed=9)).status_code == 201  # type: ignore[attr-defined]
    v2 = served(c, "up", 2)
    assert v2["version"] == 2 and v2["answer"] != v1["answer"]
    listed = c.get("/v1/checkpoints", headers=READ).json()["checkpoints"]
    assert listed == [{"name": "up", "version": 2, "method": "m2pt", "classes": 0}]
    shown = c.get("/v1/checkpoints/up", headers=READ).json()
    assert shown["method"] == "m2pt" and [v["version"] for v in shown["versions"]] == [1, 2]
    r = c.post("/v1/checkpoints/up/activate", json={"version": 1}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["version"] == 1
    again = served(c, "up", 1)
    assert (again["version"], again["answer"]) == (1, v1["answer"])
    assert c.delete("/v1/checkpoints/up", headers=ADMIN).status_code == 200
    deadline = time.monotonic() + 10
    while answer(c, "up").status_code != 404 and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.05)
    assert answer(c, "up").status_code == 404  # type: ignore[attr-defined]


def test_llava_uploads_are_validated_against_the_llava_backbone(
    llava_client: TestClient, llava: LlavaBackbone
) -> None:
    from tests.llava.conftest import make_backbone

    other = make_backbone(seed=1)  # same shapes, other weights: another fingerprint
    r = upload(llava_client, m2pt_blob(other, name="foreign"))
    assert r.status_code == 422 and r.json()["error"]["code"] == "backbone_mismatch"  # type: ignore[attr-defined]
    # a manifest saying 3 textual tokens over tensors holding 10: the shapes are checked
    good = m2pt_blob(llava, name="swap")
    swapped = good.replace(b'\\"n_text\\":10', b'\\"n_text\\": 3')
    assert swapped != good and len(swapped) == len(good)
    r = upload(llava_client, swapped)
    assert r.status_code == 422 and r.json()["error"]["code"] == "shape_mismatch"  # type: ignore[attr-defined]
    ref = BackboneRef(model="x", pretrained="none", fingerprint=llava.fingerprint)
    coop = Manifest(name="cls", method="coop", backbone=ref, classnames=["cat", "dog"])
    r = upload(llava_client, dump({"ctx": torch.zeros(4, 48)}, coop))
    assert r.status_code == 422 and "CLIP backbone" in r.json()["error"]["message"]  # type: ignore[attr-defined]
    params = M2PT().init(llava, M2PT().config({}))
    params["text_prompts"][0, 0, 0] = float("nan")
    m2pt = Manifest(name="nan", method="m2pt", backbone=ref, classnames=[])
    r = upload(llava_client, dump(params, m2pt))
    assert r.status_code == 422 and r.json()["error"]["code"] == "non_finite_tensor"  # type: ignore[attr-defined]
    assert llava_client.get("/v1/checkpoints", headers=READ).json()["checkpoints"] == []


def test_classify_and_embed_on_llava_say_which_backbone(llava_client: TestClient) -> None:
    for path, body in (
        ("/v1/classify", {"classnames": ["a", "b"], "images": ["aGk="]}),
        ("/v1/embed", {"texts": ["a cat"]}),
    ):
        r = llava_client.post(path, json=body, headers=READ)
        assert r.status_code == 404, (path, r.text)
        err = r.json()["error"]
        assert err["code"] == "wrong_backbone" and "LLaVA" in err["message"]
        assert "CLIP backbone" in err["message"]


def test_answer_and_chat_on_clip_say_which_backbone(backbone: ClipBackbone, tmp_path: Path) -> None:
    with serve(backbone, tmp_path, model="tiny_clip", pretrained="none") as client:
        for path, body in (("/v1/answer", ASK), ("/v1/chat/completions", CHAT)):
            r = client.post(path, json=body, headers=READ)
            assert r.status_code == 404, (path, r.text)
            err = r.json()["error"]
            assert err["code"] == "wrong_backbone" and "LLaVA backbone" in err["message"]
        ok = client.post(
            "/v1/classify", json={"classnames": ["a", "b"], "images": []}, headers=READ
        )
        assert ok.status_code != 404  # classification itself is served here
