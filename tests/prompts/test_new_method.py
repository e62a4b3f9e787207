"""Adding a method is one module and one registry line: a method registered in-test (TaskRes,
tests/prompts/taskres.py, the worked example of docs/ARCHITECTURE.md) trains through the jobs'
`run`, is validated and published like any other, and is served by /v1/classify; nothing else
in the service names it."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from prompts_store import open_store
from service.app import create_app
from service.prompts.registry import METHODS, get_method, trainable
from service.settings import Settings
from service.training.runs import EvalSet, RunData, TrainSpec, run
from service.training.trainer import tensor_batches
from tests.conftest import CLASSNAMES
from tests.prompts.taskres import TaskRes

ROOT = Path(__file__).resolve().parents[2]


def _png(image: torch.Tensor) -> str:
    buf = io.BytesIO()
    pixels = (image.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def taskres(monkeypatch: pytest.MonkeyPatch) -> TaskRes:
    method = TaskRes()
    monkeypatch.setitem(METHODS, method.name, method)  # the one registry line, in-test
    return method


def test_a_registered_method_trains_publishes_and_serves(backbone, taskres, tmp_path):
    assert get_method("taskres") is taskres and "taskres" in trainable("classify")
    # Images as the service will see them: PNGs decoded and preprocessed by the backbone.
    raw = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    pngs = [_png(x) for x in raw]
    labels = torch.arange(8) % 4
    images = torch.stack(
        [backbone.preprocess(Image.open(io.BytesIO(base64.b64decode(p)))) for p in pngs]
    )

    def load(spec: TrainSpec, bb: object, batch_size: int) -> RunData:
        evals = {"train": EvalSet(list(CLASSNAMES), lambda: [(images, labels)])}
        return RunData(list(CLASSNAMES), tensor_batches(images, labels, 8), evals, {})

    spec = TrainSpec.model_validate(
        {
            "name": "toy", "method": "taskres", "dataset": {"kind": "image_folder", "root": "-"},
            "method_config": {"alpha": 1.0}, "recipe": {"lr": 0.05, "epochs": 30},
        }
    )  # fmt: skip
    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    result = run(spec, backbone, store, load)
    store.close()
    assert result.published.method == "taskres" and result.published.version == 1
    assert result.result.history[-1]["loss"] < result.result.history[0]["loss"]
    assert result.result.params["residual"].abs().sum() > 0  # it learned something
    trained = result.metrics["train"]["accuracy"]

    settings = Settings(store=store_url, runtime="torch")
    with TestClient(create_app(settings, backbone=backbone)) as client:
        r = client.post("/v1/classify", json={"checkpoint": "toy", "images": pngs, "top_k": 1})
        assert r.status_code == 200, r.text
        body = r.json()["results"][0]
        assert body["method"] == "taskres" and body["version"] == 1
        top = [preds[0]["label"] for preds in body["predictions"]]
        served = sum(t == CLASSNAMES[int(y)] for t, y in zip(top, labels, strict=True)) / 8
        # the same images through the serving path score what the run reported
        assert served == pytest.approx(trained)


def test_the_worked_example_in_the_architecture_doc_is_this_module():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    module = (ROOT / "tests" / "prompts" / "taskres.py").read_text()
    assert any(block.strip() in module and "class TaskRes(" in block for block in blocks)
    assert '"taskres": TaskRes()' in doc or "TaskRes()," in doc  # the registry line
