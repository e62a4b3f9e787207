"""`promptserve checkpoints ...`: list, activate, roll back, delete from a shell, on the store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prompts_store import open_store
from service.cli import main


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """A file store with pets v1..v3 (v3 current) and cars v1, as publish() records them."""
    url = f"file://{tmp_path / 'store'}"
    store = open_store(url)
    for i in (1, 2, 3):
        store.put("pets", f"blob{i}".encode(), {"method": "coop", "backbone": "fp-a"})
    store.put("cars", b"c", {"method": "maple", "backbone": "fp-a"})
    store.close()
    return url


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["checkpoints", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def current(url: str, name: str) -> int | None:
    store = open_store(url)
    try:
        return store.current(name)
    finally:
        store.close()


def test_list_and_versions(store_url, capsys):
    code, out, _ = run(capsys, "list", "--store", store_url, "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["pets"]["current"] == 3 and rows["pets"]["versions"] == 3
    assert rows["cars"]["method"] == "maple"
    code, out, _ = run(capsys, "versions", "pets", "--store", store_url, "--json")
    assert [(v["version"], v["current"]) for v in json.loads(out)] == [
        (1, False), (2, False), (3, True)
    ]  # fmt: skip
    code, out, _ = run(capsys, "list", "--store", store_url)
    assert out.splitlines()[0].split() == ["name", "current", "versions", "method", "created_at"]


def test_rollback_activate_and_the_environment_store(store_url, capsys, monkeypatch):
    assert run(capsys, "rollback", "pets", "--store", store_url)[0] == 0
    assert current(store_url, "pets") == 2
    assert run(capsys, "rollback", "pets", "--store", store_url)[0] == 0
    assert current(store_url, "pets") == 1
    code, _, err = run(capsys, "rollback", "pets", "--store", store_url)
    assert code == 2 and "no version older" in err and current(store_url, "pets") == 1
    monkeypatch.setenv("PROMPTSERVE_STORE", store_url)  # no --store: the setting
    code, out, _ = run(capsys, "activate", "pets", "3", "--json")
    assert code == 0 and json.loads(out) == {
        "name": "pets", "version": 3, "previous": 1, "active": True
    }  # fmt: skip
    code, _, err = run(capsys, "rollback", "pets", "--to", "9")
    assert code == 2 and "not_found" in err and current(store_url, "pets") == 3
    code, _, err = run(capsys, "activate", "pets", "1", "--expected", "2")
    assert code == 2 and "conflict" in err and current(store_url, "pets") == 3


def test_refuses_a_version_for_another_backbone(store_url, capsys):
    store = open_store(store_url)
    store.put("pets", b"other", {"method": "coop", "backbone": "fp-b"}, activate=False)
    store.close()
    code, _, err = run(capsys, "activate", "pets", "4", "--store", store_url)
    assert code == 2 and "backbone" in err and current(store_url, "pets") == 3


def test_delete_needs_yes(store_url, capsys):
    assert run(capsys, "delete", "cars", "--store", store_url)[0] == 2
    assert current(store_url, "cars") == 1
    assert run(capsys, "delete", "cars", "--store", store_url, "--yes")[0] == 0
    code, _, err = run(capsys, "versions", "cars", "--store", store_url)
    assert code == 2 and "not_found" in err


def test_export_writes_the_stored_bytes(store_url, tmp_path, capsys):
    out = tmp_path / "pets.safetensors"
    code, text, _ = run(capsys, "export", "pets@2", "--out", str(out), "--store", store_url)
    assert code == 0 and out.read_bytes() == b"blob2" and "v2" in text
    code, _, err = run(capsys, "export", "pets", "--out", str(out), "--store", store_url)
    assert code == 2 and "--force" in err and out.read_bytes() == b"blob2"  # never clobbered
    # the top-level form DESIGN.md names, current version by default
    assert main(["export", "pets", "--out", str(out), "--force", "--store", store_url]) == 0
    assert out.read_bytes() == b"blob3"
    capsys.readouterr()
    code, _, err = run(capsys, "export", "nope", "--out", str(tmp_path / "x"), "--store", store_url)
    assert code == 2 and "not_found" in err and not (tmp_path / "x").exists()
    code, _, err = run(
        capsys, "export", "pets@two", "--out", str(tmp_path / "x"), "--store", store_url
    )
    assert code == 2 and "bad_request" in err
