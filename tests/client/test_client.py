"""`promptserve.client.Client` against a real uvicorn server on loopback: every call, images in
every form, typed results, and errors as exceptions carrying the API's code and status."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from promptserve.client import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    ClassifyResponse,
    Client,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    UnprocessableError,
)
from service import schemas
from service.checkpoints import load
from service.cli import main as cli_main
from tests.client.conftest import ADMIN, READ
from tests.conftest import CLASSNAMES
from tests.engine.test_residency import checkpoint
from tests.procs import colour_items

PIXELS = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def admin(url: str):
    with Client(url, api_key=ADMIN) as c:
        yield c


@pytest.fixture(scope="module")
def reader(url: str):
    with Client(url, api_key=READ) as c:
        yield c


@pytest.fixture(scope="module")
def uploaded(admin: Client, backbone) -> dict[str, int]:
    """Two checkpoints: `pets` (v1, v2; v2 current) and `cars` (v1)."""
    out = {}
    for name, seed in (("pets", 0), ("pets", 1), ("cars", 2)):
        out[name] = admin.upload(checkpoint(backbone, name=name, seed=seed)).version
    return out


def test_classify_takes_paths_bytes_pil_and_arrays_alike(reader, uploaded, tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(_png(PIXELS))
    forms = [
        str(path),
        path,
        _png(PIXELS),
        Image.fromarray(PIXELS),
        PIXELS,
        PIXELS.astype(np.float32) / 255.0,  # floats in [0, 1]
    ]
    answer = reader.classify(forms, checkpoint="pets", top_k=2)
    assert isinstance(answer, schemas.ClassifyResponse) and answer is not None
    (result,) = answer.results
    assert (result.checkpoint, result.version, result.method) == ("pets", 2, "coop")
    assert len(result.predictions) == len(forms)
    first = [(p.label, round(p.score, 5)) for p in result.predictions[0]]
    assert {label for label, _ in first} <= set(CLASSNAMES) and len(first) == 2
    for preds in result.predictions[1:]:  # the same pixels, whatever the form (PNG is lossless)
        assert [(p.label, round(p.score, 5)) for p in preds] == first
    one = reader.classify(str(path), checkpoint="pets", top_k=2)  # a single image needs no list
    assert [(p.label, round(p.score, 5)) for p in one.results[0].predictions[0]] == first


def test_classify_several_checkpoints_and_pinned_versions(reader, uploaded):
    answer = reader.classify([PIXELS, PIXELS], checkpoints=["pets@1", "cars"], top_k=1)
    got = [(r.checkpoint, r.version, len(r.predictions)) for r in answer.results]
    assert got == [("pets", 1, 2), ("cars", 1, 2)]


def test_ad_hoc_zero_shot(reader):
    answer = reader.classify(
        [PIXELS], classnames=["cat", "dog", "car"], templates=["a photo of a {}."], top_k=3
    )
    (result,) = answer.results
    assert result.checkpoint is None and result.method == "zeroshot"
    assert sorted(p.label for p in result.predictions[0]) == ["car", "cat", "dog"]
    assert sum(p.score for p in result.predictions[0]) == pytest.approx(1.0, abs=1e-4)


def test_embed_images_under_a_checkpoint_and_texts(reader, uploaded):
    out = reader.embed([PIXELS], texts=["a cat", "a dog"], checkpoint="pets")
    assert isinstance(out, schemas.EmbedResponse)
    assert (out.checkpoint, out.version) == ("pets", 2)
    assert len(out.image_embeddings) == 1 and len(out.text_embeddings) == 2
    for vec in out.image_embeddings + out.text_embeddings:
        assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-4)
    plain = reader.embed([PIXELS])
    assert plain.checkpoint is None and plain.text_embeddings == []


def test_upload_activate_rollback_and_compare_and_set(admin, backbone, tmp_path):
    first = admin.upload(checkpoint(backbone, name="swap", seed=5))
    assert (first.name, first.version, first.active) == ("swap", 1, True)
    kept = admin.upload(load(checkpoint(backbone, name="swap", seed=6), backbone), activate=False)
    assert (kept.version, kept.active) == (2, False)  # an in-memory Checkpoint, serialized
    assert [(v.version, v.active) for v in admin.versions("swap").versions] == [
        (1, True),
        (2, False),
    ]
    assert admin.activate("swap", 2, expected=1).version == 2
    with pytest.raises(ConflictError) as lost:  # somebody else's change came first
        admin.activate("swap", 1, expected=1)
    assert (lost.value.status, lost.value.code) == (409, "conflict")
    assert "expected version 1 to be current but version 2 is" in lost.value.message
    assert admin.checkpoint("swap").version == 2  # the lost compare-and-set changed nothing
    back = admin.rollback("swap")
    assert (back.name, back.version) == ("swap", 1)
    with pytest.raises(ConflictError, match="no version older"):
        admin.rollback("swap")
    assert admin.rollback("swap", to=2).version == 2
    listed = {c.name: c.version for c in admin.checkpoints().checkpoints}
    assert listed["swap"] == 2
    page = admin.checkpoints("SWA", limit=1)  # search (case-insensitive) and paging
    assert [c.name for c in page.checkpoints] == ["swap"] and (page.total, page.limit) == (1, 1)
    everything = admin.checkpoints()
    rest = admin.checkpoints(limit=1, offset=1)
    assert rest.total == everything.total >= 3 and rest.offset == 1
    assert [c.name for c in rest.checkpoints] == [everything.checkpoints[1].name]
    with open(tmp_path / "swap.safetensors", "wb+") as f:  # an open file, read by the client
        f.write(checkpoint(backbone, name="swap", seed=7))
        f.seek(0)
        assert admin.upload(f, activate=False).version == 3
    assert admin.delete("swap").deleted
    with pytest.raises(NotFoundError) as gone:
        admin.versions("swap")
    assert gone.value.status == 404 and gone.value.code == "not_found"


def test_errors_carry_the_api_code_and_status(url, reader, uploaded):
    with pytest.raises(PermissionDeniedError) as denied:
        reader.upload(b"not a checkpoint")
    assert (denied.value.status, denied.value.code) == (403, "forbidden")
    with Client(url, api_key="") as anonymous, pytest.raises(AuthenticationError) as anon:
        anonymous.checkpoints()
    assert anon.value.status == 401
    with Client(url, api_key=ADMIN) as admin, pytest.raises(UnprocessableError) as bad:
        admin.upload(b"not a checkpoint")
    assert bad.value.status == 422 and bad.value.code == "malformed_checkpoint"
    with pytest.raises(APIError) as bad_image:
        reader.classify([b"\x89PNG\r\n\x1a\n broken"], checkpoint="pets")
    assert (bad_image.value.status, bad_image.value.code) == (422, "invalid_image")
    with pytest.raises(NotFoundError) as missing:
        reader.classify([PIXELS], checkpoint="no-such-checkpoint")
    assert missing.value.code == "not_found"


def test_nothing_listening_is_a_connection_error(tmp_path):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago and is closed now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}") as c, pytest.raises(APIConnectionError):
        c.checkpoints()


def test_jobs_submit_wait_and_cancel(admin, reader):
    spec = {
        "name": "colours",
        "method": "coop",
        "method_config": {"n_ctx": 4},
        "dataset": {"kind": "upload", "images": colour_items(4)},
        "recipe": {"epochs": 3, "batch_size": 4, "warmup_epochs": 0, "lr": 0.05},
    }
    submitted = admin.jobs.submit(spec)
    assert submitted.state == "queued" and submitted.id
    seen: list[str] = []
    done = admin.jobs.wait(
        submitted.id, timeout=300, poll_s=0.1, on_progress=lambda j: seen.append(j.state)
    )
    assert done.state == "finished", done
    assert done.result is not None and done.result.name == "colours" and done.result.version == 1
    assert set(seen) <= {"queued", "started"}
    answer = reader.classify([PIXELS], checkpoint="colours", top_k=1)
    assert answer.results[0].predictions[0][0].label in {"red", "green", "blue", "gray"}
    long = admin.jobs.submit({**spec, "name": "long", "recipe": {**spec["recipe"], "epochs": 500}})
    cancelled = admin.jobs.cancel(long.id)
    assert cancelled.state in ("cancelled", "started")
    final = admin.jobs.wait(long.id, timeout=120, poll_s=0.1)
    assert final.state == "cancelled"
    with pytest.raises(NotFoundError):
        reader.versions("long")  # a cancelled run publishes nothing
    with pytest.raises(PermissionDeniedError):
        reader.jobs.submit(spec)


def test_the_classify_command_talks_http_through_the_client(
    url, uploaded, tmp_path, capsys, monkeypatch
):
    image = tmp_path / "one.png"
    image.write_bytes(_png(PIXELS))
    monkeypatch.setenv("PROMPTSERVE_API_KEY", READ)
    assert (
        cli_main(["classify", "--url", url, "--checkpoint", "pets", "--top-k", "2", str(image)])
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{image}  [pets v2]  ") and line.count(",") == 1
    assert (
        cli_main(["classify", "--url", url, "--checkpoints", "pets@1,cars", "--json", str(image)])
        == 0
    )
    parsed = ClassifyResponse.model_validate(json.loads(capsys.readouterr().out))
    assert [(r.checkpoint, r.version) for r in parsed.results] == [("pets", 1), ("cars", 1)]
    code = cli_main(["classify", "--url", url, "--checkpoint", "nope", str(image)])
    assert code == 2 and "error (not_found)" in capsys.readouterr().err
    code = cli_main(["classify", "--url", url, str(image)])  # what to classify under: none
    assert code == 2 and "exactly one of --checkpoint" in capsys.readouterr().err
